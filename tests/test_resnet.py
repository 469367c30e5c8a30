"""ResNet (RSB) with BatchNorm and the zeroed-squares sub-branch, bottleneck (50/101/152) and basic
blocks (18/34): parity with timm, PyTorch's BatchNorm and the official MaskSub step (fixtures from
tools/make_resnet_fixtures.py), the statistics in the train step, the configs, and timm weights in
and out."""
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import checkpoint, configs, convert, losses, masksub, sharding, train
from masksub_jax import config as config_lib
from masksub_jax import step as step_lib
from masksub_jax.models import layers, resnet, weights
from tests.conftest import REPO, digits_file_config, digits_main_command, tiny_digits_config, wait_for_step
from tests.seeded import seeded_batchnorm_weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# The fixtures' tiny timm models (timm's plain stem is 64 wide).
TINY = ((1, 1, 1, 1), 64, (4, 8, 16, 32), "bottleneck")  # resnet_parity.npz
TINY_BASIC = ((2, 1, 1, 1), 64, (4, 8, 16, 32), "basic")  # resnet_basic_parity.npz
# layout -> (fixture file, our variant of its tiny model, BatchNorms in that model)
LAYOUTS = {"bottleneck": ("resnet_parity", "parity", 17), "basic": ("resnet_basic_parity", "parity_basic", 15)}


@functools.cache
def _fixture(name: str) -> dict:
    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def fx():
    return _fixture("resnet_parity")


@pytest.fixture(scope="module")
def fx_basic():
    return _fixture("resnet_basic_parity")


@pytest.fixture(autouse=True)
def _parity_variant(monkeypatch):
    monkeypatch.setitem(resnet.VARIANTS, "parity", TINY)
    monkeypatch.setitem(resnet.VARIANTS, "parity_basic", TINY_BASIC)


def _state_dict(fx, prefix):
    return {k.split("/", 1)[1]: v for k, v in fx.items() if k.startswith(prefix + "/")}


def _variables(fx, variant="parity"):
    return resnet.from_timm(_state_dict(fx, "tiny"), variant=variant)


def _rel(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


MODEL = resnet.ResNet(num_classes=10, variant="parity", block_size=16)
MODELS = {"parity": MODEL, "parity_basic": resnet.ResNet(num_classes=10, variant="parity_basic", block_size=16)}


def _layout(layout):
    """(fixture, our variant, our model, BatchNorm count) of the tiny model with `layout`'s blocks."""
    name, variant, norms = LAYOUTS[layout]
    return _fixture(name), variant, MODELS[variant], norms


def _train_forward(model):
    """masksub's Forward for a model with batch_stats (the trainer's, without dropout or drop-path)."""
    def forward(p, state, images, rng, **corruption):
        del rng
        return model.apply({"params": p, **state}, images, train=True, mutable=list(state), **corruption)
    return forward


def _running(fx, prefix, variant="parity"):
    """Our batch_stats tree from the fixture's running_mean / running_var buffers."""
    sd = {**_state_dict(fx, "tiny"), **_state_dict(fx, prefix)}
    return resnet.from_timm(sd, variant=variant)["batch_stats"]


# --------------------------------------------------------------------------------------------------
# The model.
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_logits_equal_timm_on_the_same_weights(layout):
    fx, variant, model, _ = _layout(layout)
    logits = model.apply(_variables(fx, variant), jnp.asarray(fx["images"]))
    assert _rel(logits, fx["tiny_logits"]) < 1e-5


def test_resnet50_logits_equal_timm_at_64px_and_export_gives_timm_names_and_shapes(fx):
    names = list(fx["resnet50_names"])
    shapes = {n: tuple(int(d) for d in s.split(",") if d) for n, s in zip(names, fx["resnet50_shapes"])}
    sd = seeded_batchnorm_weights(shapes)
    variables = resnet.from_timm(sd, variant="50")
    image = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32).transpose(0, 2, 3, 1)
    logits = resnet.ResNet(num_classes=1000, variant="50").apply(variables, jnp.asarray(image))
    assert _rel(logits, fx["resnet50_logits"]) < 1e-5
    exported = resnet.to_timm(variables)
    assert list(exported) == names or sorted(exported) == sorted(names)
    assert {k: v.shape for k, v in exported.items()} == shapes
    for k, v in sd.items():  # export(load(sd)) == sd, bit for bit (the counters are written as 0)
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_resnet18_logits_equal_timm_at_64px_and_resnet18_34_are_read_and_written_in_timms_names(fx_basic):
    """The basic-block layouts as timm has them: the variant read from the names and shapes alone,
    the seeded resnet18's logits, and export giving back timm's state dict (strict-loadable)."""
    specs = {name: {n: tuple(int(d) for d in s.split(",") if d)
                    for n, s in zip(fx_basic[f"{name}_names"], fx_basic[f"{name}_shapes"])}
             for name in ("resnet18", "resnet34")}
    sd = seeded_batchnorm_weights(specs["resnet18"])
    assert resnet.detect(sd) == {"variant": "18", "image_size": None, "num_classes": 1000, "config": {}}
    variables = resnet.from_timm(sd)
    image = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32).transpose(0, 2, 3, 1)
    logits = resnet.ResNet(num_classes=1000, variant="18").apply(variables, jnp.asarray(image))
    assert _rel(logits, fx_basic["resnet18_logits"]) < 1e-5
    exported = resnet.to_timm(variables)
    assert sorted(exported) == sorted(sd) and {k: v.shape for k, v in exported.items()} == specs["resnet18"]
    for k, v in sd.items():  # export(load(sd)) == sd, bit for bit (the counters are written as 0)
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert resnet.timm_model(exported, "18") == ("resnet18", {})

    sd34 = {k: np.zeros(s, np.int64 if k.endswith("num_batches_tracked") else np.float32)
            for k, s in specs["resnet34"].items()}
    assert resnet.detect(sd34)["variant"] == "34"
    exported = resnet.to_timm(resnet.from_timm(sd34))
    assert {k: v.shape for k, v in exported.items()} == specs["resnet34"]
    assert resnet.timm_model(exported, "34") == ("resnet34", {})


def test_basic_block_variants_count_timms_flops_and_tiny_ones_name_timms_model(fx_basic):
    """ResNet-18/34 at 224 px: 1.814 / 3.664 GMACs (torchvision's ResNet18/34_Weights, timm 1.82 / 3.67)."""
    config = configs.get("resnet50")
    for variant, macs in (("18", 1.814e9), ("34", 3.664e9)):
        config.model.variant = variant
        assert resnet.forward_flops(config, 1000) == pytest.approx(2 * macs, rel=1e-3), variant
    # A basic-block size timm has no name for: resnet18 with our blocks per stage and widths.
    assert resnet.timm_model(_state_dict(fx_basic, "tiny"), "parity_basic") == (
        "resnet18", {"layers": (2, 1, 1, 1), "channels": (4, 8, 16, 32)})


def test_parameter_counts_are_timms():
    # timm: resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032; resnet101 44,549,160;
    # resnet152 60,192,808 parameters.
    for variant, count in (("18", 11_689_512), ("34", 21_797_672), ("50", 25_557_032), ("101", 44_549_160),
                           ("152", 60_192_808)):
        shapes = jax.eval_shape(resnet.ResNet(num_classes=1000, variant=variant).init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 64, 64, 3)))
        assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"])) == count, variant


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_mode_forward_updates_running_statistics_like_pytorch(layout):
    fx, variant, model, norms = _layout(layout)
    logits, updated = model.apply(_variables(fx, variant), jnp.asarray(fx["images"]), train=True,
                                  mutable=["batch_stats"])
    assert _rel(logits, fx["tiny_train_logits"]) < 1e-5
    want = weights.flatten(_running(fx, "after_train_forward", variant))
    got = weights.flatten(updated["batch_stats"])
    assert set(got) == set(want) and len(got) == 2 * norms  # mean and var of every BatchNorm
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_batchnorm_groups_normalise_each_group_by_its_own_statistics():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 3)) * 3 + 1
    grouped = resnet.BatchNorm(group_size=4)
    variables = grouped.init(jax.random.PRNGKey(1), x, train=False)
    y, stats = grouped.apply(variables, x, train=True, mutable=["batch_stats"])
    halves = [resnet.BatchNorm().apply(variables, x[i:i + 4], train=True, mutable=["batch_stats"]) for i in (0, 4)]
    np.testing.assert_allclose(y, jnp.concatenate([h[0] for h in halves]), rtol=1e-6, atol=1e-6)
    for name in ("mean", "var"):  # the running statistics move by the mean over groups
        want = (halves[0][1]["batch_stats"][name] + halves[1][1]["batch_stats"][name]) / 2
        np.testing.assert_allclose(stats["batch_stats"][name], want, rtol=1e-6)
    # Against NumPy: the unbiased variance of one group of 4 x 5 x 5 values.
    first = np.asarray(x[:4]).reshape(-1, 3)
    np.testing.assert_allclose(halves[0][1]["batch_stats"]["var"], 0.9 + 0.1 * first.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(halves[0][1]["batch_stats"]["mean"], 0.1 * first.mean(0), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# The sub-branch and the step.
def test_zeroed_squares_count_and_positions():
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 64, 3)) + 5.0
    units = (64 // 16) ** 2
    keep_idx = masksub.keep_indices(jax.random.PRNGKey(1), 3, units, 0.75)
    out = np.asarray(layers.keep_blocks(images, keep_idx, 16, fill=0.0))
    squares = out.reshape(3, 4, 16, 4, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, units, -1)
    zeroed = np.all(squares == 0.0, axis=-1)
    assert zeroed.sum(axis=1).tolist() == [units - int(units * 0.25)] * 3  # int(L * (1 - ratio)) kept
    for j in range(3):
        assert sorted(np.flatnonzero(~zeroed[j])) == sorted(np.asarray(keep_idx[j]))
    kept = squares[~zeroed]
    assert np.all(kept > 0)  # untouched: every original value is about 5


def test_keeping_every_square_is_the_main_branch(fx):
    every = jnp.tile(jnp.arange(4)[None], (4, 1))
    images = jnp.asarray(fx["images"])
    main, _ = MODEL.apply(_variables(fx), images, train=True, mutable=["batch_stats"])
    sub, _ = MODEL.apply(_variables(fx), images, train=True, mutable=["batch_stats"], keep_idx=every)
    np.testing.assert_array_equal(sub, main)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masksub_loss_gradients_and_statistics_equal_the_official_step(layout, monkeypatch):
    """The official code's two backward passes, BatchNorm in training mode in both forwards."""
    fx, variant, model, _ = _layout(layout)
    variables = _variables(fx, variant)
    monkeypatch.setattr(masksub, "keep_indices", lambda *args: jnp.asarray(fx["keep_idx"]))
    (total, aux), grads = jax.jit(lambda p, s: masksub.grads(
        p, s, _train_forward(model), jnp.asarray(fx["images"]), jnp.asarray(fx["targets"]), jax.random.PRNGKey(0),
        loss=losses.LOSSES["bce_soft"], mode="masking", ratio=0.5, num_units=4))(
        variables["params"], {"batch_stats": variables["batch_stats"]})
    assert float(aux["loss_main"]) == pytest.approx(float(fx["loss_main"]), rel=1e-5)
    assert float(aux["loss_sub"]) == pytest.approx(float(fx["loss_sub"]), rel=1e-5)
    assert float(total) == pytest.approx(0.5 * float(fx["loss_main"]) + 0.5 * float(fx["loss_sub"]), rel=1e-5)
    theirs = {**{k: np.zeros_like(v) for k, v in _state_dict(fx, "tiny").items()}, **_state_dict(fx, "grads")}
    want = weights.flatten(resnet.from_timm(theirs, variant=variant)["params"])
    got = weights.flatten(grads)
    assert set(got) == set(want)
    for k in want:
        assert _rel(got[k], want[k]) < 1e-4, k
    # The running statistics moved twice: main branch, then sub-branch.
    want_stats = weights.flatten(_running(fx, "after_step", variant))
    for k, v in weights.flatten(aux["model_state"]["batch_stats"]).items():
        np.testing.assert_allclose(v, want_stats[k], rtol=1e-5, atol=1e-6, err_msg=k)


# The step tests share a handful of compiled programs (in this process and, through the persistent
# compilation cache, with the trainer's): AdamW with a large eps, so that an update is smooth in its
# gradient, for comparing steps whose sums are rounded differently. (Adam's and LAMB's first step
# divides a gradient element by its own size, which turns rounding in a near-zero element into a
# whole lr step; with eps 1e-3 rounding moves an update by at most lr / eps times its own size.)
def _step_config(**overrides):
    return tiny_digits_config("/unused", batch_size=8, loss="bce_soft", label_smoothing=0.0, **{
        "model.family": "resnet", "model.variant": "parity", "data.image_size": 32, "data.mean": (0.5,) * 3,
        "data.std": (0.5,) * 3, "masksub.block_size": 16, "mixup.mixup_alpha": 0.0, "mixup.cutmix_alpha": 0.0,
        "optim.name": "adamw", "optim.eps": 1e-3, **overrides})


def _model_and_optimizer(config):
    model = step_lib.make_model(config, 10)
    tx, schedule = step_lib.make_optimizer(config, total_steps=1, steps_per_epoch=1)  # as train.run's 1-step run
    return model, tx, schedule


@functools.cache
def _jitted(overrides: tuple, mesh=None):
    """(init, train_step) of `_step_config(**dict(overrides))`, jitted once; with a mesh, the
    train step as the trainer compiles it (shardings, donated state)."""
    config = _step_config(**dict(overrides))
    model, tx, schedule = _model_and_optimizer(config)
    train_step = step_lib.make_train_step(config, model, tx, schedule, 10)
    init = jax.jit(step_lib.make_init(model, tx, (32, 32, 3)))
    if mesh is None:
        return init, jax.jit(train_step)
    state_sharding = sharding.state_sharding(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
    return init, jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh),
                                                   sharding.replicated(mesh)),
                         out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


BATCH = {"image": np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
         "label": np.random.default_rng(1).integers(0, 10, 8).astype(np.int32)}


def _one_step(state=None, **overrides):
    """(initial state, new state, metrics) of one train step on BATCH."""
    init, train_step = _jitted(tuple(sorted(overrides.items())))
    if state is None:
        state = init(jax.random.PRNGKey(0))
    return (state, *train_step(state, BATCH, jax.random.PRNGKey(3)))


def test_statistics_move_once_in_the_baseline_twice_with_masksub_and_not_on_a_nonfinite_step():
    # The squares the step keeps, drawn as it draws them: step.py splits its rng into (mix, loss),
    # masksub.branches the loss rng into (main, sub, corruption).
    rng_corruption = jax.random.split(jax.random.split(jax.random.PRNGKey(3))[1], 3)[2]
    keep = masksub.keep_indices(rng_corruption, 8, 4, 0.5)
    initial, plain, _ = _one_step(**{"masksub.mode": "none"})
    _, masked, _ = _one_step(initial)

    # Each branch's batch statistics, independently: one forward from zero running statistics
    # leaves 0.1 x the batch mean and 0.1 x the unbiased batch variance.
    model = resnet.ResNet(num_classes=10, variant="parity", block_size=16)
    images = (jnp.asarray(BATCH["image"], jnp.float32) - 127.5) / 127.5
    zero = jax.tree.map(jnp.zeros_like, initial["batch_stats"])

    def batch_stats(**corruption):
        _, out = model.apply({"params": initial["params"], "batch_stats": zero}, images, train=True,
                             mutable=["batch_stats"], **corruption)
        return jax.tree.map(lambda s: s / 0.1, out["batch_stats"])
    main, sub = batch_stats(), batch_stats(keep_idx=keep)
    once = jax.tree.map(lambda r, m: 0.9 * r + 0.1 * m, initial["batch_stats"], main)
    twice = jax.tree.map(lambda r, s: 0.9 * r + 0.1 * s, once, sub)
    for got, want in ((plain["batch_stats"], once), (masked["batch_stats"], twice)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert not np.allclose(plain["batch_stats"]["bn1"]["mean"], masked["batch_stats"]["bn1"]["mean"])

    # A NaN loss: the update is not applied, nor are the statistics moved.
    poisoned = {**initial, "params": jax.tree.map(lambda p: p, initial["params"])}
    poisoned["params"]["head"]["bias"] = poisoned["params"]["head"]["bias"].at[0].set(jnp.nan)
    _, state, metrics = _one_step(poisoned)
    assert float(metrics["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(initial["batch_stats"])):
        np.testing.assert_array_equal(a, b)


def test_one_step_on_8_devices_equals_1_device_with_global_statistics():
    """The trainer's shardings, the batch split over 8 devices: with bn_group_size 0 BatchNorm's
    statistics are those of the whole batch, so the step is the one-device step."""
    initial, want, want_metrics = _one_step(**{"model.bn_group_size": 0})
    mesh = sharding.make_mesh(1)
    init, train_step = _jitted((("model.bn_group_size", 0),), mesh)
    state_sharding = sharding.state_sharding(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
    got, metrics = train_step(jax.device_put(initial, state_sharding), BATCH, jax.random.PRNGKey(3))
    assert len(got["batch_stats"]["bn1"]["mean"].sharding.device_set) == 8
    for key in ("loss_main", "loss_sub", "grad_norm"):
        assert float(metrics[key]) == pytest.approx(float(want_metrics[key]), rel=1e-5), key
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(step_lib.variables(got)),
                            jax.tree.leaves(step_lib.variables(want))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_accumulation_with_batchnorm_groups_of_the_micro_batch_gives_the_full_batch_update():
    """Groups of 4: each micro-batch of 4 is normalised exactly as within the whole batch of 8."""
    _, full, full_metrics = _one_step(**{"model.bn_group_size": 4})
    _, accumulated, metrics = _one_step(accum_steps=2, **{"model.bn_group_size": 4})
    for key in ("loss_main", "loss_sub", "grad_norm"):
        assert float(metrics[key]) == pytest.approx(float(full_metrics[key]), rel=1e-5), key
    for a, b in zip(jax.tree.leaves(accumulated["params"]), jax.tree.leaves(full["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # 0.2% of lr


# --------------------------------------------------------------------------------------------------
# The trainer: configs/digits.py with a digits-sized ResNet (1 channel, 8 px, squares of 4 px).
DIGITS_RESNET = {"model.family": "resnet", "model.variant": "mu", "model.drop_path": 0.0, "masksub.block_size": 4,
                 "total_steps": 24, "checkpoint_every_steps": 4, "log_every_steps": 1, "eval_every_steps": 0,
                 "optim.warmup_epochs": 0.0}


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return np.array([[m["train/loss_main"], m["train/loss_sub"]] for m in map(json.loads, f) if "train/loss" in m])


def _converted_digits_weights(directory) -> str:
    """timm-named weights of a digits-sized ResNet (1 channel) with running statistics that no fresh
    model has, converted by the CLI as a user would; returns the converted directory."""
    model = resnet.ResNet(num_classes=10, variant="mu", block_size=4)
    variables = jax.device_get(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 1))))
    rng = np.random.default_rng(0)
    variables["batch_stats"] = jax.tree.map(lambda v: (v + 0.2 * np.abs(rng.standard_normal(v.shape))).astype(
        np.float32), variables["batch_stats"])
    np.savez(os.path.join(directory, "timm.npz"), **resnet.to_timm(variables))
    convert.main([f"--from={os.path.join(directory, 'timm.npz')}", f"--to={os.path.join(directory, 'init')}",
                  "--family=resnet", "--variant=mu"])
    return os.path.join(directory, "init")


def test_converted_weights_train_survive_kill_9_and_export_their_statistics(digits_dir, tmp_path, capsys):
    """The user's story: timm weights in (running statistics too) -> init_from -> a digits ResNet run
    on 8 devices that learns; the same run killed with SIGKILL and rerun ends bit-identical,
    statistics included; the result goes back out in timm's names."""
    overrides = {**DIGITS_RESNET, "init_from": _converted_digits_weights(str(tmp_path))}
    reference = str(tmp_path / "reference")
    assert train.run(digits_file_config(digits_dir, overrides), reference)["step"] == 24
    assert f"Initialised the batch_stats and params from {overrides['init_from']}" in capsys.readouterr().out
    losses_main = _losses(reference)[:, 0]
    assert losses_main.shape == (24,) and losses_main[-4:].mean() < losses_main[:4].mean()  # it learns

    workdir = str(tmp_path / "w")
    proc = subprocess.Popen(digits_main_command(workdir, digits_dir, overrides), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    wait_for_step(proc, 7)  # killed well before step 24, once the step-4 checkpoint is on disk
    deadline = time.monotonic() + 60
    while not checkpoint.manager(workdir, read_only=True).all_steps() and time.monotonic() < deadline:
        time.sleep(0.05)  # the step-4 checkpoint is written in the background
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    done = subprocess.run(digits_main_command(workdir, digits_dir, overrides), cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and "Resuming from the checkpoint of step" in done.stdout, done.stdout[-3000:]
    want, got = checkpoint.load_variables(reference), checkpoint.load_variables(workdir)
    assert sorted(got) == ["batch_stats", "params"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)

    convert.main(["--to_timm", f"--from={workdir}", f"--to={tmp_path / 'out.npz'}", "--family=resnet"])
    with np.load(tmp_path / "out.npz") as exported:
        assert exported["fc.weight"].shape == (10, 256) and exported["conv1.weight"].shape == (8, 1, 7, 7)
        np.testing.assert_array_equal(exported["layer4.0.bn3.running_var"],
                                      got["batch_stats"]["layer4_0"]["bn3"]["var"])
        assert int(exported["bn1.num_batches_tracked"]) == 0


# --------------------------------------------------------------------------------------------------
# Configs.


def test_shipped_configs_carry_the_official_rsb_command():
    for name, variant in (("resnet50", "50"), ("resnet101", "101"), ("resnet152", "152")):
        c = configs.get(name)
        config_lib.validate(c, num_devices=8)
        assert (c.model.family, c.model.variant, c.model.bn_group_size) == ("resnet", variant, 256)
        assert (c.batch_size, c.total_epochs, c.data.image_size, c.data.crop_ratio) == (2048, 300.0, 224, 0.95)
        assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.warmup_epochs) == ("lamb", 5e-3, 0.02, 5.0)
        assert (c.optim.warmup_init_lr, c.optim.min_lr) == (1e-4, 1e-6)
        assert (c.loss, c.label_smoothing, c.mixup.mixup_alpha, c.mixup.cutmix_alpha) == ("bce_soft", 0.0, 0.0, 1.0)
        assert (c.data.augment, c.data.repeated_aug, c.data.random_erasing) == ("rand-m7-mstd0.5", 3, 0.0)
        assert (c.masksub.mode, c.masksub.ratio, c.masksub.block_size, c.model.drop_path) == ("masking", 0.5, 32, 0.0)
        assert resnet.num_units(c) == 49


def test_resnet50_config_runs_3_steps_on_synthetic_data_at_a_tiny_size(tmp_path):
    """As a user tries a config without ImageNet: the command line, one device, 32 px."""
    overrides = {"data.source": "synthetic", "data.image_size": 32, "batch_size": 8, "eval_batch_size": 8,
                 "data.num_train_examples": 16, "data.num_eval_examples": 8, "model.bn_group_size": 4,
                 "masksub.block_size": 16, "total_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 3}
    command = [sys.executable, "-m", "masksub_jax.main", "--config=configs/resnet50.py", f"--workdir={tmp_path}",
               *[f"--config.{k}={v}" for k, v in overrides.items()]]
    one_device = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(command, cwd=REPO, env=one_device,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Training ResNet-50 (23.53M params) with MaskSub mode=masking ratio=0.5 for 3 steps of 8" in done.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["eval_examples"] == 8


@pytest.mark.parametrize("overrides, message", [
    ({"model.variant": "26"}, r"model.variant='26' is invalid: Unknown ResNet variant"),
    ({"masksub.mode": "dropout"}, r"ResNet-parity implements the sub-branches \('masking', 'droppath'\)"),
    ({"masksub.block_size": 12}, r"masksub.block_size=12 is invalid: the zeroed squares must tile data.image_size=32"),
    ({"model.bn_group_size": 3}, r"model.bn_group_size=3 is invalid: .* divide the batch each forward sees \(8"),
    ({"model.bn_group_size": 8, "accum_steps": 2}, r"bn_group_size=8 is invalid: .*\(4 = batch_size / accum_steps\)"),
])
def test_bad_resnet_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(_step_config(**overrides))


# --------------------------------------------------------------------------------------------------
# timm weights in and out.
def test_missing_and_misshapen_weights_are_named(fx):
    sd = _state_dict(fx, "tiny")
    with pytest.raises(weights.ConversionError, match=r"missing keys \['layer2.0.bn3.running_var'\]"):
        resnet.from_timm({k: v for k, v in sd.items() if k != "layer2.0.bn3.running_var"}, variant="parity")
    with pytest.raises(weights.ConversionError,
                       match=r"does not fit ResNet-mu \(bottleneck blocks\): the weights are ResNet-parity"):
        resnet.from_timm(sd, variant="mu")
    assert weights.flatten(resnet.from_timm(sd, variant=None)).keys() == weights.flatten(_variables(fx)).keys()


def test_convert_cli_writes_parameters_and_running_statistics_and_init_from_fits_them(fx, tmp_path):
    np.savez(tmp_path / "tiny.npz", **_state_dict(fx, "tiny"))
    convert.main([f"--from={tmp_path / 'tiny.npz'}", f"--to={tmp_path / 'init'}", "--family=resnet",
                  "--variant=parity"])
    loaded = convert.read_variables(str(tmp_path / "init"))
    assert sorted(loaded) == ["batch_stats", "params"]
    np.testing.assert_array_equal(loaded["batch_stats"]["layer3_0"]["bn2"]["var"], fx["tiny/layer3.0.bn2.running_var"])
    # init_from into a model with another head: the head starts fresh, the statistics are the file's.
    initial = jax.device_get(resnet.ResNet(num_classes=3, variant="parity").init(jax.random.PRNGKey(0),
                                                                                 jnp.zeros((1, 32, 32, 3))))
    said = []
    adapted = convert.adapt_variables(loaded, initial, family="resnet", say=said.append)
    np.testing.assert_array_equal(adapted["batch_stats"]["bn1"]["mean"], fx["tiny/bn1.running_mean"])
    np.testing.assert_array_equal(adapted["params"]["head"]["kernel"], initial["params"]["head"]["kernel"])
    assert any("head/kernel" in line for line in said)
    with pytest.raises(weights.ConversionError, match=r"holds no \['batch_stats'\]"):
        convert.adapt_variables({"params": loaded["params"]}, initial, family="resnet")


def test_a_variant_of_the_other_block_layout_or_size_is_named(fx, fx_basic, tmp_path, capsys):
    """--variant against the weights: the other block layout (conv3 present or absent) or another size
    of the same layout, one line naming both and the fix."""
    basic, bottleneck = _state_dict(fx_basic, "tiny"), _state_dict(fx, "tiny")
    with pytest.raises(weights.ConversionError, match=r"does not fit ResNet-50 \(bottleneck blocks\): the weights "
                       r"are ResNet-parity_basic \(basic blocks, blocks per stage \(2, 1, 1, 1\).*Leave out --variant"):
        resnet.from_timm(basic, variant="50")
    with pytest.raises(weights.ConversionError, match=r"ResNet-18 \(basic blocks\): the weights are ResNet-parity "
                                                      r"\(bottleneck blocks"):
        resnet.from_timm(bottleneck, variant="18")
    with pytest.raises(weights.ConversionError, match=r"does not fit ResNet-34 \(basic blocks\): the weights are "
                       r"ResNet-parity_basic \(basic blocks, blocks per stage \(2, 1, 1, 1\)"):
        resnet.from_timm(basic, variant="34")
    unknown = {k: v for k, v in basic.items() if not k.startswith("layer1.1.")}  # (1, 1, 1, 1): no variant of ours
    with pytest.raises(weights.ConversionError, match=r"ResNet-50 \(bottleneck blocks\): the weights have basic "
                                                      r"blocks, blocks per stage \(1, 1, 1, 1\)"):
        resnet.from_timm(unknown, variant="50")
    assert resnet.detect(basic)["variant"] == "parity_basic" and resnet.detect(bottleneck)["variant"] == "parity"
    # As the user meets it: python -m masksub_jax.convert --variant=34 on resnet18-like weights.
    np.savez(tmp_path / "basic.npz", **basic)
    with pytest.raises(SystemExit) as exit_:
        convert.main([f"--from={tmp_path / 'basic.npz'}", f"--to={tmp_path / 'init'}", "--variant=34"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and err[0].startswith("error: The checkpoint does not fit ResNet-34")
    assert not (tmp_path / "init").exists()
