"""Which files are images: the one list every reader uses (datasets, calibration folders,
prediction inputs), and the sorted images of a folder (local or URL)."""
from dinomaly_jax import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image(path: str) -> bool:
  """By extension, case-insensitive."""
  return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str) -> list[str]:
  """Sorted image files of a folder (not recursive; hidden files left out)."""
  return [storage.join(folder, f) for f in storage.listdir(folder)
          if not f.startswith(".") and is_image(f)]
