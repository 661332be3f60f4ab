"""The same work as Dinomaly-JAX, in PyTorch, for side-by-side timing only.

The encoder is the transformers DINOv2 (with registers) model running PyTorch's fused
`scaled_dot_product_attention` ("sdpa"; the `dinov2` package's attention does not use
it without xFormers). Everything after the encoder is written here in plain torch
ops. This is a timing twin, not a correctness reference: weights are random.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F
import transformers

from dinomaly_jax.models import vit as vit_lib


class TorchEncoder(nn.Module):
  """DINOv2 blocks 0..max(layers) (later blocks are not built); returns chosen block outputs."""

  def __init__(self, vit: str, registers: int, layers):
    super().__init__()
    spec = vit_lib.VIT_VARIANTS[vit]
    if spec["ffn"] != "mlp":
      raise ValueError(f"The torch benchmark twin supports MLP encoders, not vit={vit!r}.")
    common = dict(hidden_size=spec["embed_dim"], num_hidden_layers=max(layers) + 1,
                  num_attention_heads=spec["num_heads"], mlp_ratio=4, patch_size=14,
                  image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0,
                  attn_implementation="sdpa")
    if registers:
      config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
      self.model = transformers.Dinov2WithRegistersModel(config)
    else:
      self.model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    self.model.layernorm = nn.Identity()  # Dinomaly uses raw block outputs
    self.layers = list(layers)

  def forward(self, images):  # (B, 3, H, W) -> list of (B, N, D)
    hidden = self.model(pixel_values=images, output_hidden_states=True).hidden_states
    return [hidden[i + 1] for i in self.layers]  # hidden[0] is the embedding output


class LinearAttentionBlock(nn.Module):
  """Pre-norm block with elu+1 linear attention (no softmax, no scale)."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-8), nn.LayerNorm(dim, eps=1e-8)
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

  def forward(self, x):  # (B, N, D)
    b, n, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, d)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2))
    out = torch.einsum("bhnd,bhde->bhne", q, kv) / normaliser[..., None]
    x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TorchDinomaly(nn.Module):
  """Encoder -> noisy bottleneck -> 8 linear-attention blocks -> loose groups."""

  def __init__(self, vit: str, registers: int, target_layers, fuse_groups, depth: int = 8,
               dropout: float = 0.2):
    super().__init__()
    self.encoder = TorchEncoder(vit, registers, target_layers)
    for p in self.encoder.parameters():
      p.requires_grad_(False)
    dim, heads = vit_lib.VIT_VARIANTS[vit]["embed_dim"], vit_lib.VIT_VARIANTS[vit]["num_heads"]
    self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
    self.dropout = nn.Dropout(dropout)
    self.blocks = nn.ModuleList(LinearAttentionBlock(dim, heads) for _ in range(depth))
    self.fuse_groups = [list(g) for g in fuse_groups]

  def forward(self, images):  # -> (enc_groups, dec_groups), lists of (B, D, h, w)
    h, w = images.shape[2] // 14, images.shape[3] // 14
    with torch.no_grad():
      features = self.encoder(images)
    x = torch.stack(features).mean(0)
    x = self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.dropout(x))))))
    outputs = []
    for block in self.blocks:
      x = block(x)
      outputs.append(x)
    return _groups(features, self.fuse_groups, h, w), _groups(outputs[::-1], self.fuse_groups, h, w)

  def trainable_parameters(self):
    return [p for p in self.parameters() if p.requires_grad]


def _groups(tokens, groups, h, w):
  maps = []
  for group in groups:
    mean = torch.stack([tokens[i] for i in group]).mean(0)[:, -h * w:]  # (B, h*w, D)
    maps.append(mean.transpose(1, 2).reshape(mean.shape[0], -1, h, w))
  return maps


def hard_mining_loss(enc_groups, dec_groups, p: float, easy_factor: float = 0.1):
  """Global cosine loss; gradients of the easiest points scaled by `easy_factor`."""
  losses = []
  for a, b in zip(enc_groups, dec_groups):
    a = a.detach()
    with torch.no_grad():
      distance = 1 - F.cosine_similarity(a, b, dim=1)  # (B, h, w)
      k = max(int(distance.numel() * (1 - p)), 1)
      thresh = torch.topk(distance.reshape(-1), k=k)[0][-1]
      factor = torch.where(distance < thresh, easy_factor, 1.0)[:, None]
    if b.requires_grad:
      b.register_hook(lambda g, factor=factor: g * factor)
    losses.append((1 - F.cosine_similarity(a.flatten(1), b.flatten(1))).mean())
  return sum(losses) / len(losses)


def gaussian_kernel(size: int = 5, sigma: float = 4.0):
  x = torch.arange(size, dtype=torch.float32) - size // 2
  g = torch.exp(-x**2 / (2 * sigma**2))
  g = g / g.sum()
  return (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)


def anomaly_scores(enc_groups, dec_groups, input_size: int, map_size: int = 256,
                   top_ratio: float = 0.01, kernel=None):
  """-> (maps (B, map_size, map_size), image scores (B,))."""
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
  """The benchmarked PyTorch calls; inputs are NHWC numpy images like the JAX side's."""

  def __init__(self, vit, registers, target_layers, fuse_groups, depth, dropout):
    import optimi  # pylint: disable=g-import-not-at-top
    self.model = TorchDinomaly(vit, registers, target_layers, fuse_groups, depth, dropout)
    self.optimizer = optimi.StableAdamW(self.model.trainable_parameters(), lr=2e-3,
                                        betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-10)
    self.kernel = gaussian_kernel()
    self.step = 0

  @staticmethod
  def _nchw(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

  @staticmethod
  def to_heads_first(x):  # (B, N, heads, head_dim) numpy -> (B, heads, N, head_dim) torch
    return torch.from_numpy(x).transpose(1, 2).contiguous()

  @staticmethod
  def attention(q, k, v):
    with torch.inference_mode():
      return F.scaled_dot_product_attention(q, k, v)

  def encoder_forward(self, images):
    with torch.inference_mode():
      return self.model.encoder(self._nchw(images))

  def inference(self, images):
    self.model.eval()
    with torch.inference_mode():
      enc_groups, dec_groups = self.model(self._nchw(images))
      return anomaly_scores(enc_groups, dec_groups, images.shape[1], kernel=self.kernel)

  def train_step(self, images):
    """Forward, hard-mining loss, backward, clip 0.1, StableAdamW step at the schedule's lr."""
    self.model.train()
    for group in self.optimizer.param_groups:
      group["lr"] = warm_cosine_lr(self.step)
    enc_groups, dec_groups = self.model(self._nchw(images))
    loss = hard_mining_loss(enc_groups, dec_groups, p=min(0.9 * self.step / 1000, 0.9))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), 0.1)
    self.optimizer.step()
    self.step += 1
    return loss.item()
