"""``lomar bench``: training-step timing and FLOP counts, profiles, the loader and the high-resolution backbone."""
