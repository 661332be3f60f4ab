"""Evaluation: anomaly maps and scores, the seven metrics (AUPRO included), the eval loop,
reports (terminal, JSON, CSV, Markdown) and pictures.

May import: models, data, config, weights, sharding, errors. Never training/ or inference/.
"""
