"""The DeiT-III ViT: parameter counts, shapes, token dropping and the sub-branch forward overrides."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masksub_jax import masksub
from masksub_jax.models import vit


def count(variant, image_size=224, num_classes=1000):
    model = vit.ViT(num_classes=num_classes, variant=variant)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def expected_count(width, depth, patch, image_size=224, num_classes=1000, channels=3):
    """DeiT-III parameters written out: patch conv, pos_embed (no cls slot), cls, blocks, norm, head."""
    tokens = (image_size // patch) ** 2
    block = (2 * 2 * width  # two LayerNorms
             + width * 3 * width + 3 * width + width * width + width  # qkv, proj
             + width * 4 * width + 4 * width + 4 * width * width + width  # fc1, fc2
             + 2 * width)  # LayerScale gammas
    return (patch * patch * channels * width + width + tokens * width + width + depth * block
            + 2 * width + width * num_classes + num_classes)


@pytest.mark.parametrize("variant,width,depth,published", [("S/16", 384, 12, 22.0e6), ("B/16", 768, 12, 86.6e6)])
def test_parameter_counts_match_published(variant, width, depth, published):
    n = count(variant)
    assert n == expected_count(width, depth, 16)
    assert abs(n - published) / published < 0.005, n  # the papers round to 0.1M


def test_logits_shape_and_other_sizes():
    model = vit.ViT(num_classes=7, variant="mu/14")
    x = jnp.ones((2, 28, 42, 3))
    params = model.init(jax.random.PRNGKey(0), x)
    assert model.apply(params, x).shape == (2, 7)
    assert params["params"]["pos_embed"].shape == (1, 2 * 3, 64)


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    model = vit.ViT(num_classes=3, variant="mu/14")
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 160, 160, 3)))


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown ViT variant 'X/16'"):
        vit.parse_variant("X/16")


def _tokens_entering_first_block(model, params, images, **kwargs):
    seen = []

    def interceptor(next_fun, args, kwargs_, context):
        if context.module.name == "blocks_0" and context.method_name == "__call__":
            seen.append(args[0])
        return next_fun(*args, **kwargs_)

    with nn.intercept_methods(interceptor):
        model.apply(params, images, **kwargs)
    return seen[0]


def test_token_dropping_keeps_cls_and_the_chosen_patches():
    model = vit.ViT(num_classes=5, variant="mu/4")
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(0), images)
    keep = masksub.keep_indices(jax.random.PRNGKey(2), 3, 16, 0.5)
    tokens = np.asarray(_tokens_entering_first_block(model, params, images, keep_idx=keep))
    assert tokens.shape == (3, 1 + 8, 64)

    # Independently: patches flattened in (row, col, channel) order times the conv kernel, + pos_embed.
    p = params["params"]
    patches = np.asarray(images).reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 16, 48)
    kernel = np.asarray(p["patch_embed"]["kernel"]).reshape(48, 64)
    embedded = patches @ kernel + np.asarray(p["patch_embed"]["bias"]) + np.asarray(p["pos_embed"])
    for b in range(3):
        np.testing.assert_allclose(tokens[b, 0], np.asarray(p["cls_token"])[0, 0], rtol=1e-6)
        np.testing.assert_allclose(tokens[b, 1:], embedded[b, np.asarray(keep[b])], rtol=1e-4, atol=1e-5)


def test_dropped_patches_do_not_affect_the_sub_branch():
    model = vit.ViT(num_classes=5, variant="mu/4")
    images = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3))
    params = model.init(jax.random.PRNGKey(0), images)
    keep = jnp.array([[0, 3]])  # patches (0,0) and (1,1) kept, (0,1) and (1,0) dropped
    changed_dropped = images.at[:, 0:4, 4:8].add(5.0)
    changed_kept = images.at[:, 4:8, 4:8].add(5.0)
    base = model.apply(params, images, keep_idx=keep)
    np.testing.assert_allclose(model.apply(params, changed_dropped, keep_idx=keep), base, rtol=1e-6)
    assert not np.allclose(model.apply(params, changed_kept, keep_idx=keep), base)


def test_sub_branch_equals_main_branch_when_nothing_is_dropped():
    model = vit.ViT(num_classes=5, variant="mu/4")
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(0), images)
    all_tokens = masksub.keep_indices(jax.random.PRNGKey(3), 4, 16, 0.0)  # every token, shuffled
    assert all_tokens.shape == (4, 16)
    rngs = {"dropout": jax.random.PRNGKey(4), "droppath": jax.random.PRNGKey(5)}
    main = model.apply(params, images, train=True, rngs=rngs)
    sub = model.apply(params, images, train=True, rngs=rngs, keep_idx=all_tokens, dropout_rate=0.0,
                      drop_path_rate=0.0)
    np.testing.assert_allclose(sub, main, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override", ["dropout_rate", "drop_path_rate"])
def test_dropsub_and_pathsub_overrides_change_the_training_forward(override):
    model = vit.ViT(num_classes=5, variant="mu/4", layerscale_init=1.0)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(0), images)
    rngs = {"dropout": jax.random.PRNGKey(4), "droppath": jax.random.PRNGKey(5)}
    main = model.apply(params, images, train=True, rngs=rngs)
    assert np.allclose(main, model.apply(params, images))  # the model's own rates are 0
    sub = model.apply(params, images, train=True, rngs=rngs, **{override: 0.5})
    assert not np.allclose(sub, main, atol=1e-3)
    np.testing.assert_allclose(model.apply(params, images, train=False, **{override: 0.5}), main, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits_close_to_float32():
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    f32 = vit.ViT(num_classes=5, variant="mu/4", layerscale_init=0.5)
    bf16 = vit.ViT(num_classes=5, variant="mu/4", layerscale_init=0.5, dtype=jnp.bfloat16)
    params = f32.init(jax.random.PRNGKey(0), images)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.init(jax.random.PRNGKey(0), images)))
    want, got = f32.apply(params, images), bf16.apply(params, images)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.abs(want).max()) + 1e-3)
    assert not np.array_equal(got, want)  # really computed in bfloat16


@pytest.mark.parametrize("tokens", [5, 8, 99])
def test_padded_attention_equals_plain_attention_with_its_gradient(tokens):
    """The padding that cuDNN's sequence-length rule needs changes neither the output nor the gradient."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(tokens), (3, 2, tokens, 3, 16))

    def naive(q, k, v):  # independent: softmax(q k^T / sqrt(d)) v per head
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)

    def padded(q, k, v):
        return vit.padded_attention(q, k, v, multiple=8)

    np.testing.assert_allclose(padded(q, k, v), naive(q, k, v), rtol=1e-5, atol=1e-6)
    want = jax.grad(lambda *x: jnp.sum(jnp.sin(naive(*x))), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *x: jnp.sum(jnp.sin(padded(*x))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
