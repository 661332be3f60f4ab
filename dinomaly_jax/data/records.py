"""The record every dataset layout produces."""
import dataclasses

GOOD = "good"  # defect type of normal images


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a dataset split.

  Attributes:
    image_path: path of the image file.
    class_name: the object or texture class the image belongs to.
    label: 0 normal, 1 anomalous.
    defect_type: "good" for normal images, else the defect folder / anomaly class.
    mask_path: ground-truth mask of an anomalous image; None for normal images (all zero).
  """
  image_path: str
  class_name: str
  label: int
  defect_type: str
  mask_path: str | None
