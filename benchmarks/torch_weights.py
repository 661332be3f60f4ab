"""Random-weight PyTorch DINOv2 models and their block outputs, for parity tests and benchmarks.

The models come from independent implementations on PyPI (`dinov2`, `transformers`,
`timm`); this module only fills their parameters and reads their intermediate layers.
"""
import torch


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Fills every parameter with non-trivial random values (in place)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith(("gamma", "lambda1")):  # LayerScale
        p.copy_(torch.rand(p.shape, generator=gen) * 0.9 + 0.1)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
      elif p.ndim > 1 and not any(t in name for t in ("token", "pos", "position")):
        p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
      else:  # biases, cls/register/mask tokens, position embeddings
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
  return module.eval()


def official_layers(model, images, layers):
  with torch.no_grad():
    if model.chunked_blocks:
      outputs = model._get_intermediate_layers_chunked(torch.from_numpy(images), layers)
    else:
      outputs = model._get_intermediate_layers_not_chunked(torch.from_numpy(images), layers)
  return [o.numpy() for o in outputs]
