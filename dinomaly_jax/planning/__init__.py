"""Planning a run: compile for a TPU slice anywhere (the compile mode)."""
