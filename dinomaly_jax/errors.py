"""The errors that mean bad input from the user: main prints them as one message."""
from dinomaly_jax.checkpoint import IncompatibleWorkdirError
from dinomaly_jax.config_validation import ConfigError
from dinomaly_jax.data.records import DataError
from dinomaly_jax.encoder_weights import EncoderWeightsError
from dinomaly_jax.train import NonFiniteLossError

USER_ERRORS = (ConfigError, DataError, EncoderWeightsError, IncompatibleWorkdirError,
               NonFiniteLossError, FileNotFoundError)
