"""Inference on new images: predict (scores, decisions, heatmaps, CSV) and export (jax.export).

May import: training (to restore a trained state), evaluation, and everything below.
"""
