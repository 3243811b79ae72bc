"""Timing and FLOP counting for ``lomar bench``."""
