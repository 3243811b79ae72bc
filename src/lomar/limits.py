"""Bounds on what a flag or a file may ask a model to be built for; imports no torch."""

__all__ = ["MAX_IMG_SIZE"]

# The largest image side: an --img-size, or the size a checkpoint's or export's settings give (an
# absolute position table and every activation grow with it). Far above what the method is run at
# (the backbone benchmarks go to 2048 px), far below what would take the machine down first.
MAX_IMG_SIZE = 8192
