"""What the train recipes do to the pixels, after `data/` has read, decoded and cropped them:

  spec.py     what a recipe is, read by both implementations: the 3-Augment constants, the
              RandAugment spec, op sets and magnitude maps, and which work runs where
  host.py     the per-pixel ops in TensorFlow, per image in tf.data (data.augment_on="host")
  device.py   the same ops, name for name, batched in JAX in the train step (data.augment_on="device")
  erasing.py  random erasing, in the train step
  mixing.py   mixup / cutmix and the soft targets, in the train step

Nothing here imports `data/` or the trainer; `data/indexed.py` calls the host side, `step.py` the
device side.
"""
