"""A model family from outside the package, as a researcher would write one: a linear classifier
whose masking units are the image's rows of pixels (dropped rows are zeroed). Used by test_families.py."""
import flax.linen as nn
import jax.numpy as jnp

CLASSIFIER = "classifier"  # the Dense that gives the logits (the default name is "head")


class RowLinear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, images, *, train=False, keep_idx=None, dropout_rate=None, drop_path_rate=None,
                 first_example=0):
        del train, dropout_rate, drop_path_rate, first_example
        if keep_idx is not None:
            images = images * _kept_rows(images, keep_idx)
        return nn.Dense(self.num_classes, name=CLASSIFIER)(images.reshape(images.shape[0], -1))


def _kept_rows(images, keep_idx):
    """(batch, rows, 1, 1) booleans: the rows that keep_idx keeps."""
    kept = jnp.zeros(images.shape[:2], bool).at[jnp.arange(images.shape[0])[:, None], keep_idx].set(True)
    return kept[:, :, None, None]


def describe(config):
    return "RowLinear"


def check(config):
    del config


def build(config, num_classes):
    del config
    return RowLinear(num_classes)


def num_units(config):
    return config.data.image_size


def draw_kept(config, images, keep_idx, fill):
    """The input preview: the dropped rows painted `fill`."""
    del config
    return jnp.where(_kept_rows(images, keep_idx), images, fill)
