"""Figures: reconstructions and attention maps."""
