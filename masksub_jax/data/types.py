"""What every data source shares, in a module that the sources and `pipeline.py` (which alone knows
which sources exist) both import: the batch type, the errors a source raises, and the eval batch
size.
"""
import math

import numpy as np

Batch = dict[str, np.ndarray]


class DataNotFoundError(FileNotFoundError):
    """The data set is not prepared where the config says."""


class CorruptImageError(ValueError):
    """An image of the data set cannot be decoded (config.data.on_corrupt_image = "fail")."""


def capped_eval_batch_size(eval_batch_size: int, num_eval_examples: int, multiple: int) -> int:
    """The eval batch, no larger than the eval set rounded up to `multiple` (the device count, which
    must divide it): a small eval set is not padded out to a large batch."""
    return min(eval_batch_size, max(1, math.ceil(num_eval_examples / multiple)) * multiple)
