"""With libtpu installed (the [tpu] extra, for the compile mode) on a machine without a TPU,
the test processes stay on the CPU without libtpu's start-up warnings, as the main job does."""
from dinomaly_jax import platforms

platforms.use_local_hardware_only()
