"""Figures: reconstructions, BEiT token maps, attention maps, training curves, study plots."""
