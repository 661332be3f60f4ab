"""Safe reading of PyTorch checkpoints: torch.load(weights_only=True) or safetensors."""
import pathlib

from dinomaly_jax.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model")  # common {"model": state_dict} wrappers


def _reason(error: Exception) -> str:
  """The informative part of torch's (long, multi-line) load error, on one line."""
  text = str(error)
  if "WeightsUnpickler error:" in text:  # the real cause sits between boilerplate paragraphs
    text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
  else:
    text = text.split(". ", 1)[0]
  return " ".join(text.split()) or type(error).__name__


def load_state_dict(path) -> dict:
  """Reads a state dict of tensors from .pth/.pt/.bin (torch) or .safetensors.

  Never unpickles arbitrary objects. A missing, truncated or foreign file
  raises one CheckpointError naming the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"Checkpoint {path} does not exist or is not a file.")
  import torch  # Imported here: only conversion needs torch.
  try:
    if path.suffix == ".safetensors":
      from safetensors.torch import load_file
      state = load_file(str(path))
    else:
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch/safetensors raise many types for bad files
    raise CheckpointError(
        f"Cannot read checkpoint {path} ({type(e).__name__}: {_reason(e)}). Expected a complete "
        "PyTorch state dict saved with torch.save (.pth/.pt/.bin) or a .safetensors file; "
        "a truncated download gives this error too.") from None
  if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in _WRAPPER_KEYS:
    state = next(iter(state.values()))
  if not isinstance(state, dict) or not state:
    raise CheckpointError(f"Checkpoint {path} holds a {type(state).__name__}, not a state dict.")
  not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    raise CheckpointError(f"Checkpoint {path} is not a plain state dict; non-tensor entries: "
                          f"{not_tensors[:10]}.")
  if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
    state = {k[len("module."):]: v for k, v in state.items()}
  return state
