"""The reference Dinomaly procedure in PyTorch, for side-by-side timing only.

It does what the reference code (`ViTill` with the DINOv2 encoder) does per call, with
the same operations in the same order:
  encoder: the `dinov2` package's ViT (the code the reference vendors; registers are
    inserted after the class token as the reference's copy does), blocks 0..max(target
    layers) only, under torch.no_grad(). Attention "reference" is DINOv2's own
    `q @ k^T -> softmax -> @ v` (what the reference runs on CPU, where xFormers is
    absent); "sdpa" swaps in torch's fused scaled_dot_product_attention (faster).
  bottleneck: dropout, fc1, GELU, dropout, fc2, dropout;
  decoder: 8 pre-norm blocks (LayerNorm eps 1e-8) whose attention is the reference's
    LinearAttention2: elu+1 features, kv = k^T v, z = 1 / (q . sum k), out = kv q z;
  loss: the global hard-mining cosine loss (top-k threshold over the batch's point
    distances, easy points' gradients scaled by a hook);
  optimizer: gradient clipping at 0.1, then StableAdamW with AMSGrad, tensor by tensor.
`TorchTwin(compile=True)` wraps the model in torch.compile. Weights are random.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from dinomaly_jax.models import vit as vit_lib

_DINOV2_BUILDERS = {"small": "vit_small", "base": "vit_base", "large": "vit_large"}


def _sdpa_forward(attn):
  """A DINOv2 attention forward that calls torch's fused scaled_dot_product_attention."""

  def forward(x, attn_bias=None):
    del attn_bias
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))

  return forward


class TorchEncoder(nn.Module):
  """The DINOv2 ViT (all blocks, as the reference loads it); forward runs blocks
  0..max(layers) under no_grad and returns the chosen blocks' outputs (B, N, D)."""

  def __init__(self, vit: str, registers: int, layers, attention: str = "reference"):
    super().__init__()
    from dinov2.models import vision_transformer as dinov2_vit  # pylint: disable=g-import-not-at-top
    if vit not in _DINOV2_BUILDERS:
      raise ValueError(f"The torch benchmark twin supports MLP encoders, not vit={vit!r}.")
    self.vit = getattr(dinov2_vit, _DINOV2_BUILDERS[vit])(patch_size=14, img_size=518,
                                                         init_values=1.0, block_chunks=0)
    if attention == "sdpa":
      for block in self.vit.blocks:
        block.attn.forward = _sdpa_forward(block.attn)
    elif attention != "reference":
      raise ValueError(f"attention must be 'reference' or 'sdpa', got {attention!r}.")
    dim = vit_lib.VIT_VARIANTS[vit]["embed_dim"]
    self.vit.register_tokens = (nn.Parameter(torch.zeros(1, registers, dim)) if registers
                                else None)
    self.layers = list(layers)

  def forward(self, images):  # (B, 3, H, W) -> list of (B, N, D)
    with torch.no_grad():
      x = self.vit.prepare_tokens_with_masks(images)
      if self.vit.register_tokens is not None:
        x = torch.cat([x[:, :1], self.vit.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], 1)
      outputs = []
      for i, block in enumerate(self.vit.blocks[:max(self.layers) + 1]):
        x = block(x)
        if i in self.layers:
          outputs.append(x)
    return outputs


class LinearAttention(nn.Module):
  """elu+1 linear attention, computed as the reference's LinearAttention2."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

  def forward(self, x):  # (B, N, D)
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    kv = torch.einsum("...sd,...se->...de", k, v)  # (B, H, d, d)
    z = 1.0 / torch.einsum("...sd,...d->...s", q, k.sum(dim=-2))  # (B, H, N)
    out = torch.einsum("...de,...sd,...s->...se", kv, q, z)  # (B, H, N, d)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2 (the bottleneck adds dropout around and between)."""

  def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
    self.drop = nn.Dropout(dropout)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.drop(x))))))


class DecoderBlock(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-8), nn.LayerNorm(dim, eps=1e-8)
    self.attn = LinearAttention(dim, heads)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TorchDinomaly(nn.Module):
  """Encoder -> noisy bottleneck -> decoder blocks -> loose groups, as ViTill (whose state
  dict key names it shares once `encoder.vit.` is read as `encoder.`, see
  vitill_state_dict)."""

  def __init__(self, vit: str, registers: int, target_layers, fuse_groups, depth: int = 8,
               dropout: float = 0.2, attention: str = "reference"):
    super().__init__()
    self.encoder = TorchEncoder(vit, registers, target_layers, attention)
    self.encoder.requires_grad_(False)
    self.prefix = 1 + registers
    dim, heads = vit_lib.VIT_VARIANTS[vit]["embed_dim"], vit_lib.VIT_VARIANTS[vit]["num_heads"]
    self.bottleneck = nn.ModuleList([Mlp(dim, 4 * dim, dropout)])
    self.decoder = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(depth))
    self.fuse_groups = [list(g) for g in fuse_groups]

  def forward(self, images):  # -> (enc_groups, dec_groups), lists of (B, D, h, w)
    h, w = images.shape[2] // 14, images.shape[3] // 14
    features = self.encoder(images)
    x = self.bottleneck[0](torch.stack(features, dim=1).mean(dim=1))
    outputs = []
    for block in self.decoder:
      x = block(x)
      outputs.append(x)
    return (self._groups(features, h, w), self._groups(outputs[::-1], h, w))

  def _groups(self, tokens, h, w):
    maps = []
    for group in self.fuse_groups:
      mean = torch.stack([tokens[i] for i in group], dim=1).mean(dim=1)[:, self.prefix:]
      maps.append(mean.permute(0, 2, 1).reshape(mean.shape[0], -1, h, w).contiguous())
    return maps

  def trainable_parameters(self):
    return [p for p in self.parameters() if p.requires_grad]


def vitill_state_dict(model: TorchDinomaly) -> dict:
  """The model's weights under the reference ViTill's key names (encoder.*, bottleneck.0.*,
  decoder.{i}.*), which weight_conversion converts to this project's parameters."""
  return {k.replace("encoder.vit.", "encoder.", 1): v for k, v in model.state_dict().items()}


def _scale_where(grad, easy, factor):
  grad[easy.expand_as(grad)] *= factor  # in place, as the reference's hook
  return grad


def hard_mining_loss(enc_groups, dec_groups, p: float, easy_factor: float = 0.1):
  """Global cosine loss; gradients of points below the k-th largest distance scaled."""
  total = 0.0
  for a, b in zip(enc_groups, dec_groups):
    a = a.detach()
    with torch.no_grad():
      distance = 1 - F.cosine_similarity(a, b).unsqueeze(1)  # (B, 1, h, w)
    thresh = torch.topk(distance.reshape(-1), k=max(int(distance.numel() * (1 - p)), 1))[0][-1]
    total = total + torch.mean(1 - F.cosine_similarity(a.reshape(a.shape[0], -1),
                                                       b.reshape(b.shape[0], -1)))
    if b.requires_grad:
      b.register_hook(lambda g, easy=distance < thresh: _scale_where(g, easy, easy_factor))
  return total / len(enc_groups)


class StableAdamW(torch.optim.Optimizer):
  """StableAdamW with AMSGrad as the reference steps it: one tensor at a time, in place."""

  def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4):
    super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      b1, b2 = group["betas"]
      for p in group["params"]:
        if p.grad is None:
          continue
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state = self.state[p]
        if not state:
          state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                       v_max=torch.zeros_like(p))
        state["step"] += 1
        t = state["step"]
        state["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
        state["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        torch.max(state["v_max"], state["v"], out=state["v_max"])
        denom = (state["v_max"].sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        rms = float((p.grad / denom).norm(2)) / p.numel()**0.5
        p.addcdiv_(state["m"], denom, value=-group["lr"] / (1 - b1**t) / max(1.0, rms))


def gaussian_kernel(size: int = 5, sigma: float = 4.0):
  x = torch.arange(size, dtype=torch.float32) - size // 2
  g = torch.exp(-x**2 / (2 * sigma**2))
  g = g / g.sum()
  return (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)


def anomaly_scores(enc_groups, dec_groups, input_size: int, map_size: int = 256,
                   top_ratio: float = 0.01, kernel=None):
  """The reference evaluation's maps and scores -> (maps (B, map_size, map_size), scores (B,))."""
  maps = []
  for a, b in zip(enc_groups, dec_groups):
    m = (1 - F.cosine_similarity(a, b, dim=1))[:, None]  # (B, 1, h, w)
    maps.append(F.interpolate(m, size=input_size, mode="bilinear", align_corners=True))
  amap = torch.cat(maps, 1).mean(1, keepdim=True)
  amap = F.interpolate(amap, size=map_size, mode="bilinear", align_corners=False)
  kernel = gaussian_kernel() if kernel is None else kernel
  amap = F.conv2d(amap, kernel, padding=kernel.shape[-1] // 2)[:, 0]
  top = max(int(map_size * map_size * top_ratio), 1)
  scores = torch.topk(amap.flatten(1), top, dim=1)[0].mean(1)
  return amap, scores


def warm_cosine_lr(step: int, lr=2e-3, final_lr=2e-4, total=10_000, warmup=100):
  if step < warmup:
    return lr * step / warmup
  t = (step - warmup) / max(total - warmup, 1)
  return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * t))


class TorchTwin:
  """The benchmarked PyTorch calls; inputs are NHWC numpy images like the JAX side's.

  attention: the encoder's "reference" (unfused, as the reference on CPU) or "sdpa";
  compile: torch.compile the model (first calls compile).
  """

  def __init__(self, vit, registers, target_layers, fuse_groups, depth, dropout,
               attention: str = "reference", compile: bool = False):  # pylint: disable=redefined-builtin
    self.model = TorchDinomaly(vit, registers, target_layers, fuse_groups, depth, dropout,
                               attention)
    self.forward = torch.compile(self.model) if compile else self.model
    self.optimizer = StableAdamW(self.model.trainable_parameters())
    self.kernel = gaussian_kernel()
    self.step = 0

  @staticmethod
  def _nchw(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

  def encoder_forward(self, images):
    with torch.inference_mode():
      return self.model.encoder(self._nchw(images))

  def inference(self, images):
    self.model.eval()
    with torch.inference_mode():
      enc_groups, dec_groups = self.forward(self._nchw(images))
      return anomaly_scores(enc_groups, dec_groups, images.shape[1], kernel=self.kernel)

  def train_step(self, images):
    """Forward, hard-mining loss, backward, clip 0.1, StableAdamW step at the schedule's lr."""
    self.model.train()
    for group in self.optimizer.param_groups:
      group["lr"] = warm_cosine_lr(self.step)
    enc_groups, dec_groups = self.forward(self._nchw(images))
    loss = hard_mining_loss(enc_groups, dec_groups, p=min(0.9 * self.step / 1000, 0.9))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), 0.1)
    self.optimizer.step()
    self.step += 1
    return loss.item()
