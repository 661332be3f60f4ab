"""Dinomaly-JAX: multi-class unsupervised anomaly detection (Dinomaly, CVPR 2025) in JAX/Flax.

The folders follow the pipeline (see ARCHITECTURE.md):
  data/ -> models/ -> training/ -> evaluation/ -> inference/, with config/ and weights/
  feeding them, and main.py / run.py as the entry. Dependencies point one way, down:
  entry -> inference -> training -> evaluation -> config, weights -> models, data ->
  errors, sharding (checked by tests/test_import_layers.py).
"""
