"""A small generated anomaly-detection dataset in the MVTec-AD layout (the demo data).

Textures are random crops of scikit-image's bundled brick, grass and gravel photographs,
tinted per class; objects (a hex nut, a two-colour pill) are drawn with PIL. Defects are
drawn as shapes whose pixels, and only those, change: the mask is that shape exactly.

  textures  scratch, hole, stain, crack
  nut       missing (a chipped corner), misplaced (off-centre hole), scratch, stain
  pill      missing (a broken end), misplaced (shifted print), crack, stain

Everything is deterministic from the seed; an image depends only on (seed, class, split,
number), not on which other classes are generated.
"""
import functools
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw
import skimage.data

from dinomaly_jax import storage

TEXTURES = {"brick": (1.0, 0.62, 0.48), "grass": (0.62, 0.95, 0.5), "gravel": (0.9, 0.88, 0.8)}
OBJECTS = ("nut", "pill")
CLASSES = tuple(TEXTURES) + OBJECTS
DEFAULT_CLASSES = ("brick", "grass", "nut", "pill")
DEFECTS = {**{t: ("scratch", "hole", "stain", "crack") for t in TEXTURES},
           "nut": ("missing", "misplaced", "scratch", "stain"),
           "pill": ("missing", "misplaced", "crack", "stain")}
_STAIN_COLOURS = ((95, 60, 20), (40, 60, 150), (60, 115, 45), (150, 40, 110))
_NUT_BG, _NUT_METAL = (48, 50, 56), (168, 168, 178)
_PILL_BG, _PILL_LEFT, _PILL_RIGHT, _PILL_INK = (214, 216, 210), (188, 52, 46), (232, 222, 196), (52, 52, 60)


def _shape(size: int, draw_fn) -> np.ndarray:
  """bool (size, size): the pixels a PIL drawing function fills."""
  canvas = Image.new("L", (size, size), 0)
  draw_fn(ImageDraw.Draw(canvas))
  return np.asarray(canvas) > 0


def _noisy(clean: np.ndarray, noise: np.ndarray) -> np.ndarray:
  return np.clip(clean.astype(np.float32) + noise, 0, 255).astype(np.uint8)


# --- Defect shapes (bool masks) ------------------------------------------------


def _polyline(rng, size, steps, step_len, turn) -> list[tuple[float, float]]:
  x, y = rng.uniform(0.3, 0.7, 2) * size
  angle = rng.uniform(0, 2 * math.pi)
  points = [(x, y)]
  for _ in range(steps):
    angle += rng.uniform(-turn, turn)
    x, y = x + step_len * math.cos(angle), y + step_len * math.sin(angle)
    points.append((x, y))
  return points


def _scratch(rng, size):
  pts = _polyline(rng, size, 3, size * rng.uniform(0.08, 0.14), 0.25)
  return _shape(size, lambda d: d.line(pts, fill=255, width=max(2, size // 100)))


def _crack(rng, size):
  pts = _polyline(rng, size, 14, size * 0.025, 0.9)
  return _shape(size, lambda d: d.line(pts, fill=255, width=max(2, size // 128)))


def _hole(rng, size):
  cx, cy = rng.uniform(0.25, 0.75, 2) * size
  rx, ry = rng.uniform(0.035, 0.07, 2) * size
  return _shape(size, lambda d: d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255))


def _blob(rng, size, cx=None, cy=None, radius=None):
  cx = rng.uniform(0.3, 0.7) * size if cx is None else cx
  cy = rng.uniform(0.3, 0.7) * size if cy is None else cy
  radius = rng.uniform(0.05, 0.1) * size if radius is None else radius
  angles = np.sort(rng.uniform(0, 2 * math.pi, 10))
  radii = radius * rng.uniform(0.7, 1.3, 10)
  pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
  return _shape(size, lambda d: d.polygon(pts, fill=255))


def _paint(kind, rng, image):
  """The image a defect paints over its shape (full size; only the shape is used)."""
  if kind == "scratch":
    return np.full_like(image, 236)
  if kind in ("crack", "hole"):
    return np.clip(rng.normal(20, 4, image.shape), 0, 255).astype(np.uint8)
  colour = np.array(_STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))], np.float32)
  return (0.45 * image + 0.55 * colour).astype(np.uint8)  # stain


_SURFACE_SHAPES = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _blob}


def _surface_defect(kind, rng, image, where=None):
  """A scratch/crack/hole/stain, kept inside `where` (bool) when given; retried if empty."""
  for _ in range(100):
    shape = _SURFACE_SHAPES[kind](rng, image.shape[0])
    if where is not None:
      shape &= where
    if shape.sum() >= 10:
      return np.where(shape[..., None], _paint(kind, rng, image), image), shape
  raise RuntimeError(f"could not place a {kind} defect")


# --- Classes -----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _texture_source(name: str) -> np.ndarray:
  return getattr(skimage.data, name)()  # (512, 512) uint8 grayscale


def _texture(name, rng, size):
  src = _texture_source(name)
  side = int(rng.integers(256, 384))
  y, x = rng.integers(0, src.shape[0] - side, 2)
  patch = np.rot90(src[y:y + side, x:x + side], int(rng.integers(4)))
  if rng.random() < 0.5:
    patch = patch[:, ::-1]
  gray = Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BILINEAR)
  tint = np.array(TEXTURES[name], np.float32) * rng.uniform(0.93, 1.07)
  return np.clip(np.asarray(gray, np.float32)[..., None] * tint, 0, 255).astype(np.uint8)


def _nut(size, cx, cy, angle, hole_dx=0.0, hole_dy=0.0):
  """Clean nut rendering (size, size, 3) and its metal region (bool)."""
  r, hole = 0.34 * size, 0.12 * size
  corners = [(cx + r * math.cos(angle + k * math.pi / 3), cy + r * math.sin(angle + k * math.pi / 3))
             for k in range(6)]
  hx, hy = cx + hole_dx, cy + hole_dy
  body = _shape(size, lambda d: d.polygon(corners, fill=255))
  body &= ~_shape(size, lambda d: d.ellipse([hx - hole, hy - hole, hx + hole, hy + hole], fill=255))
  ring = _shape(size, lambda d: d.ellipse([cx - 0.28 * size, cy - 0.28 * size, cx + 0.28 * size,
                                           cy + 0.28 * size], outline=255, width=max(2, size // 90)))
  image = np.empty((size, size, 3), np.uint8)
  image[:] = _NUT_BG
  image[body] = _NUT_METAL
  image[body & ring] = np.array(_NUT_METAL) - 35
  return image, body


def _pill(size, cx, cy, ink_dx=0.0, ink_dy=0.0):
  """Clean pill rendering (size, size, 3) and its region (bool)."""
  half_l, half_h = 0.36 * size, 0.15 * size
  body = _shape(size, lambda d: d.rounded_rectangle(
      [cx - half_l, cy - half_h, cx + half_l, cy + half_h], radius=half_h, fill=255))
  image = np.empty((size, size, 3), np.uint8)
  image[:] = _PILL_BG
  left = np.arange(size)[None, :] < cx
  image[body & left] = _PILL_LEFT
  image[body & ~left] = _PILL_RIGHT
  dot = 0.022 * size
  for k in range(3):
    x, y = cx + (0.12 + 0.06 * k) * size + ink_dx, cy + ink_dy
    image[_shape(size, lambda d: d.ellipse([x - dot, y - dot, x + dot, y + dot], fill=255))] = _PILL_INK
  return image, body


def _object(name, rng, size, kind=None):
  """A nut or pill image; with a defect kind also its mask (bool)."""
  cx, cy = (0.5 + rng.uniform(-0.02, 0.02, 2)) * size
  noise = rng.normal(0, 3, (size, size, 1)).astype(np.float32)
  if name == "nut":
    args = (cx, cy, rng.uniform(0, math.pi / 3))
    clean, body = _nut(size, *args)
  else:
    args = (cx, cy)
    clean, body = _pill(size, *args)
  image = _noisy(clean, noise)
  if kind is None:
    return image, None
  if kind == "misplaced":
    shift = rng.uniform(0.05, 0.08) * size
    direction = rng.uniform(0, 2 * math.pi)
    moved, _ = (_nut if name == "nut" else _pill)(
        size, *args, shift * math.cos(direction), shift * math.sin(direction))
    mask = (moved != clean).any(axis=-1)
    return _noisy(moved, noise), mask
  if kind == "missing":
    background = _noisy(np.broadcast_to(np.array(_NUT_BG if name == "nut" else _PILL_BG,
                                                 np.uint8), clean.shape), noise)
    if name == "nut":
      a = args[2] + math.pi / 3 * int(rng.integers(6))
      ex, ey = cx + 0.34 * size * math.cos(a), cy + 0.34 * size * math.sin(a)
    else:
      ex, ey = cx + rng.choice([-1, 1]) * 0.36 * size, cy + rng.uniform(-0.08, 0.08) * size
    mask = _blob(rng, size, ex, ey, rng.uniform(0.08, 0.11) * size) & body
    return np.where(mask[..., None], background, image), mask
  return _surface_defect(kind, rng, image, where=body)


def _sample(name, rng, size, kind=None):
  if name in TEXTURES:
    image = _texture(name, rng, size)
    return (image, None) if kind is None else _surface_defect(kind, rng, image)
  return _object(name, rng, size, kind)


def _saver(root: str, classes):
  """Checks the class names; save(array, *parts) writes a PNG under root."""
  unknown = [c for c in classes if c not in CLASSES]
  if unknown:
    raise ValueError(f"Unknown synthetic classes {unknown}; expected some of {list(CLASSES)}.")

  def save(array, *parts):
    picture = Image.fromarray(array)
    storage.write_bytes(storage.join(root, *parts), storage.encoded(lambda f: picture.save(f, format="PNG")))

  return save


def generate(root: str, *, seed: int = 0, classes=DEFAULT_CLASSES, image_size: int = 256,
             n_train: int = 30, n_test_good: int = 10, n_test_bad: int = 12) -> str:
  """Writes the dataset under root (MVTec-AD layout) and returns root.

  The defective test images cycle through the class's defect types; masks are
  ground_truth/<type>/<stem>_mask.png with values 0 and 255.
  """
  save = _saver(root, classes)
  for name in classes:
    c = CLASSES.index(name)
    for i in range(n_train):
      image, _ = _sample(name, np.random.default_rng([seed, c, 0, i]), image_size)
      save(image, name, "train", "good", f"{i:03d}.png")
    for i in range(n_test_good):
      image, _ = _sample(name, np.random.default_rng([seed, c, 1, i]), image_size)
      save(image, name, "test", "good", f"{i:03d}.png")
    for i in range(n_test_bad):
      kind = DEFECTS[name][i % len(DEFECTS[name])]
      image, mask = _sample(name, np.random.default_rng([seed, c, 2, i]), image_size, kind)
      save(image, name, "test", kind, f"{i:03d}.png")
      save(mask.astype(np.uint8) * 255, name, "ground_truth", kind, f"{i:03d}_mask.png")
  return root


def generate_mvtec_ad2(root: str, *, seed: int = 0, classes=DEFAULT_CLASSES, image_size: int = 64,
                       n_train: int = 8, n_validation: int = 3, n_test_good: int = 3,
                       n_test_bad: int = 3, n_private: int = 2) -> str:
  """The same generated images in the MVTec AD 2 layout (data/mvtec_ad2.py) under root.

  train/good, validation/good, test_public/{good,bad} with
  test_public/ground_truth/bad/<stem>_mask.png, and the unlabelled test_private
  (<i>_regular.png) and test_private_mixed (<i>_mixed.png, defective and normal mixed).
  """
  save = _saver(root, classes)
  for name in classes:
    c = CLASSES.index(name)
    normal = lambda split, i: _sample(name, np.random.default_rng([seed, c, split, i]), image_size)[0]
    defective = lambda split, i: _sample(name, np.random.default_rng([seed, c, split, i]), image_size,
                                         DEFECTS[name][i % len(DEFECTS[name])])
    for i in range(n_train):
      save(normal(0, i), name, "train", "good", f"{i:03d}_regular.png")
    for i in range(n_validation):
      save(normal(3, i), name, "validation", "good", f"{i:03d}_regular.png")
    for i in range(n_test_good):
      save(normal(1, i), name, "test_public", "good", f"{i:03d}_good.png")
    for i in range(n_test_bad):
      image, mask = defective(2, i)
      save(image, name, "test_public", "bad", f"{i:03d}_bad.png")
      save(mask.astype(np.uint8) * 255, name, "test_public", "ground_truth", "bad", f"{i:03d}_bad_mask.png")
    for i in range(n_private):
      save(normal(4, i), name, "test_private", f"{i:03d}_regular.png")
      save(defective(5, i)[0] if i % 2 else normal(5, i), name, "test_private_mixed", f"{i:03d}_mixed.png")
  return root
