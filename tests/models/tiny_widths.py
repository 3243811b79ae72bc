"""The tiny widths the model tests shrink every named size to."""

TINY = dict(embed_dim=24, depth=1, num_heads=2)
