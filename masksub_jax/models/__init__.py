"""Models. Each module says how MaskSub corrupts its input."""
