"""Models: the DINOv2 encoder, bottleneck, decoder, the Dinomaly module and its structure rules.

Pure Flax modules and functions. May import: errors.
"""
