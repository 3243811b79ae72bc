"""Checkpoints: atomic saving, safe loading, original formats, export."""
