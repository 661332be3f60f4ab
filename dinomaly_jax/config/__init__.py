"""Configuration: the protocol's defaults (defaults.py) and the check of every field (validation.py).

May import: models (the structure validator, encoder sizes), errors.
"""
