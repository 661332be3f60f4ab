"""Parameter I/O, all in one place: PyTorch checkpoint conversion (key maps, safe reading),
converted parameter directories, the encoder weights a config names, and the orbax
checkpoints of trained states with their work-directory config check.

May import: models, errors. (The command line is `python -m weight_conversion.convert`.)
"""
