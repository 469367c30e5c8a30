"""The model, optimizer, state and steps that a config describes, shared by the trainer and the
benchmarks so that both run exactly the same computation.

train_step(state, batch, rng) -> (state, metrics) and eval_step(variables, batch) -> sums are pure
functions for `jax.jit`. Batches carry uint8 images; normalisation happens here, on the device.

The train state is a dict: step, params, opt_state, rng, and the model's other collections under
their own names (ResNet's batch_stats), which training updates and checkpoints carry like the rest;
with config.ema.decay > 0 also "ema", the exponential moving average of those variables.
"""

import jax
import jax.numpy as jnp
import optax

from masksub_jax import losses, masksub, models, optim
from masksub_jax.augment import device, erasing, mixing


def make_model(config, num_classes: int):
    """The network of config.model.family (masksub_jax/models/)."""
    return models.of(config).build(config, num_classes)


def make_optimizer(config, *, total_steps: int, steps_per_epoch: int):
    """(optax transformation, learning-rate schedule)."""
    o = config.optim
    schedule = optim.lr_schedule(lr=o.lr, min_lr=o.min_lr, warmup_init_lr=o.warmup_init_lr,
                                 warmup_steps=round(o.warmup_epochs * steps_per_epoch), total_steps=total_steps)
    family = models.of(config)
    tx = optim.make(o.name, schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                    grad_clip_norm=o.grad_clip_norm, no_decay=getattr(family, "NO_DECAY", ()),
                    layer_decay=o.layer_decay, layer_ids=getattr(family, "layer_ids", None), frozen=tuple(o.frozen))
    if config.model.scan:
        tx = optim.in_layout(tx, family.unscanned, family.scanned)
    return tx, schedule


_TRAINING_KEYS = ("step", "opt_state", "rng", "ema")


def variables(state: dict) -> dict:
    """The model's variables in a train state: params and its other collections (batch_stats)."""
    return {k: v for k, v in state.items() if k not in _TRAINING_KEYS}


def model_state(state: dict) -> dict:
    """The collections other than params that training updates ({} for most models)."""
    return {k: v for k, v in variables(state).items() if k != "params"}


def make_init(model, tx, image_shape, *, ema: bool = False):
    """rng -> the train state: step, params, opt_state, the run's base rng, the model's state, and
    with `ema` the average of the variables, which starts as they do."""
    def init(rng):
        initial = model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
        params = initial["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": rng,
                 **model_state(initial)}
        return state | ({"ema": jax.tree.map(jnp.copy, variables(state))} if ema else {})
    return init


def normaliser(config):
    mean = jnp.asarray(config.data.mean, jnp.float32) * 255
    std = jnp.asarray(config.data.std, jnp.float32) * 255
    return lambda images: (images.astype(jnp.float32) - mean) / std


def make_augment(config, num_classes: int):
    """(batch, rng) -> (images, targets, rng_loss): the train step's normalised images after the
    recipe's per-pixel ops (when they run on the device), random erasing and mixup, their targets,
    and the key its loss draws from."""
    normalise = normaliser(config)
    pixel_ops = device.make(config.data)

    def augment(batch, rng):
        rng_mix, rng_loss = jax.random.split(rng)
        images = batch["image"] if pixel_ops is None else pixel_ops(batch, jax.random.fold_in(rng, 3))
        images = erasing.random_erasing(jax.random.fold_in(rng, 2), normalise(images), config.data.random_erasing)
        images, targets = mixing.mix(rng_mix, images, batch["label"], num_classes=num_classes,
                                     label_smoothing=config.label_smoothing, **config.mixup.to_dict())
        return images, targets, rng_loss
    return augment


def make_input_preview(config, num_classes: int, count: int = 8):
    """(batch, rng) -> (inputs, sub_inputs): images in [0, 1] of the batch's first `count` examples as
    the train step with `rng` feeds them to the main branch (after erasing and mixup), and for
    masking the same with the units the sub-branch does not keep greyed out (else None)."""
    augment = make_augment(config, num_classes)
    mean, std = jnp.asarray(config.data.mean, jnp.float32), jnp.asarray(config.data.std, jnp.float32)
    family = models.of(config)
    draw_kept = models.preview_drawer(family, config)

    def preview(batch, rng):
        images, _, rng_loss = augment(batch, rng)
        inputs = jnp.clip(images[:count] * std + mean, 0.0, 1.0)
        if config.masksub.mode != "masking" or config.masksub.ratio == 0 or draw_kept is None:
            return inputs, None
        keep = masksub.keep_indices(masksub.branch_rngs(rng_loss)[2], inputs.shape[0], family.num_units(config),
                                    config.masksub.ratio)  # example j's units depend only on j
        return inputs, draw_kept(inputs, keep, jnp.full(inputs.shape[-1], 0.5))
    return preview


def make_train_step(config, model, tx, schedule, num_classes: int):
    """Random erasing and mixup once, then the MaskSub loss's gradient, then one optimizer update."""
    augment = make_augment(config, num_classes)
    loss = losses.LOSSES[config.loss]
    num_units = models.of(config).num_units(config)

    def forward(params, state, images, rng, **corruption):
        """Training-mode logits and the model state they updated (BatchNorm's running statistics)."""
        rngs = {"dropout": jax.random.fold_in(rng, 0), "droppath": jax.random.fold_in(rng, 1)}
        return model.apply({"params": params, **state}, images, train=True, rngs=rngs, mutable=list(state),
                           **corruption)  # a stateless model: mutable=[] gives (logits, {})

    def micro_batch_grads(params, state, images, targets, rng, index):
        """MaskSub gradient of micro-batch `index`: its examples get the dropout and drop-path masks
        and the kept tokens that they would get in the whole batch."""
        def micro_forward(params, state, images, rng, **corruption):
            return forward(params, state, images, rng, first_example=index * images.shape[0], **corruption)
        return masksub.grads(params, state, micro_forward, images, targets, rng, loss=loss,
                             mode=config.masksub.mode, ratio=config.masksub.ratio, num_units=num_units,
                             memory_lean=config.masksub.memory_lean, first_example=index * images.shape[0])

    def accumulated_grads(params, state, images, targets, rng):
        """The batch's gradient as the mean over `accum_steps` micro-batches (less activation memory).
        The model state goes through the micro-batches in order (BatchNorm sees each one's statistics)."""
        accum = config.accum_steps
        if accum == 1:
            return micro_batch_grads(params, state, images, targets, rng, 0)
        split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])  # noqa: E731

        def body(carry, micro):
            grad_sum, state = carry
            index, images, targets = micro
            (total, aux), grads = micro_batch_grads(params, state, images, targets, rng, index)
            state = aux.pop("model_state")
            return (jax.tree.map(jnp.add, grad_sum, grads), state), (total, aux)
        zeros = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, state), (totals, aux) = jax.lax.scan(body, (zeros, state),
                                                        (jnp.arange(accum), split(images), split(targets)))
        aux = {"logits_main": aux["logits_main"].reshape(-1, aux["logits_main"].shape[-1]),
               "loss_main": aux["loss_main"].mean(), "loss_sub": aux["loss_sub"].mean(), "model_state": state}
        return (totals.mean(), aux), jax.tree.map(lambda g: g / accum, grad_sum)

    def train_step(state, batch, rng):
        images, targets, rng_loss = augment(batch, rng)
        (total, aux), grads = accumulated_grads(state["params"], model_state(state), images, targets, rng_loss)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state, "rng": state["rng"], **aux["model_state"]}
        if config.ema.decay:  # timm's ModelEma: ema = decay * ema + (1 - decay) * weights, in float32
            new_state["ema"] = optax.incremental_update(variables(new_state), state["ema"], 1 - config.ema.decay)
        # A NaN or Inf loss or gradient: the update is not applied, nor the model state's (the trainer
        # stops or goes on, per config.on_nonfinite), so parameters and checkpoints never hold NaNs.
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        new_state["step"] = state["step"] + 1
        # Against the dominant class of the mixed target: what the main branch is asked to predict.
        accuracy = jnp.mean(jnp.argmax(aux["logits_main"], -1) == jnp.argmax(targets, -1))
        return new_state, {"loss": total, "loss_main": aux["loss_main"], "loss_sub": aux["loss_sub"],
                           "accuracy": accuracy, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                           "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return train_step


def make_eval_step(config, model, num_classes: int):
    """Sums of top-1 and top-5 hits over the real (mask = 1) examples of a padded batch.
    `variables`: `variables(state)`, the parameters and (ResNet) the running statistics.
    A batch with a `label_set` (ImageNet-ReaL's multi-hot set of right answers) counts a prediction
    right when it is in the set and leaves out the images whose set is empty (Beyer et al. 2020)."""
    normalise = normaliser(config)

    def eval_step(variables, batch):
        logits = model.apply(variables, normalise(batch["image"]), train=False)
        top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
        if "label_set" in batch:
            counted = jnp.any(batch["label_set"], -1) * batch["mask"]
            right = jnp.take_along_axis(batch["label_set"], top5[:, :1], -1)[:, 0]
            return {"correct1": jnp.sum(right * counted), "count": jnp.sum(counted)}
        hits = top5 == batch["label"][:, None]
        return {"correct1": jnp.sum(hits[:, 0] * batch["mask"]),
                "correct5": jnp.sum(jnp.any(hits, -1) * batch["mask"]), "count": jnp.sum(batch["mask"])}
    return eval_step
