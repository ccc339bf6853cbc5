"""The offline demonstration data: a family of shapes tasks (source, similar, different)."""
from typing import Dict

import numpy as np

from jdl.data import Dataset, shapes


SOURCE_CLASSES = (0, 1, 2, 3, 4)  # disk, ring, square, frame, triangle
TARGET_CLASSES = (5, 6, 7, 8, 9)  # cross, star, crescent, heart, bar


def sketch(images: np.ndarray) -> np.ndarray:
  """Another style of image: dark grey line drawings of the edges on white.

  Luminance gradient magnitude (central differences), inverted, the same in
  all three channels: colour and texture are gone, only outlines remain.

  Arguments:
    images: uint8 (N, H, W, 3).
  Returns:
    uint8 (N, H, W, 3).
  """
  grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (N, H, W)
  gy, gx = np.gradient(grey, axis=(1, 2))
  edges = np.clip(np.hypot(gx, gy) * 3.0, 0, 255)
  lines = (255 - edges).astype(np.uint8)
  return np.repeat(lines[..., None], 3, axis=-1)


def _pick(images, labels, classes, per_class):
  """The first `per_class` images of each class in `classes`, labels renumbered 0.."""
  keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
  keep.sort()  # generation order, i.e. already shuffled
  relabel = np.full(max(labels.max(), max(classes)) + 1, -1, np.int32)
  relabel[list(classes)] = np.arange(len(classes))
  return images[keep], relabel[labels[keep]]


def shapes_tasks(seed: int = 0, source_per_class: int = 1000, small_per_class: int = 50,
                 large_per_class: int = 500, test_per_class: int = 200) -> Dict[str, Dataset]:
  """The offline transfer family, each a 5-class Dataset.

  'source': classes 0-4 (disk .. triangle); 'similar_small'/'similar_large':
  classes 5-9 (cross .. bar) in the same photo-like style; 'different_small'/
  'different_large': the same classes as `sketch` line drawings. The small set
  is the first `small_per_class` images per class of the large one; similar and
  different share their test images (in their styles).
  """
  seeds = np.random.SeedSequence(seed).spawn(4)
  # shapes.generate balances all 10 classes, so 10 * n images hold n of each.
  source = {"train": shapes.generate(10 * source_per_class, seeds[0]),
            "test": shapes.generate(10 * test_per_class, seeds[1])}
  target = {"train": shapes.generate(10 * large_per_class, seeds[2]),
            "test": shapes.generate(10 * test_per_class, seeds[3])}
  names = lambda classes: tuple(shapes.CLASS_NAMES[c] for c in classes)
  tasks = {"source": Dataset(
      "shapes-source", _pick(*source["train"], SOURCE_CLASSES, source_per_class),
      _pick(*source["test"], SOURCE_CLASSES, test_per_class), len(SOURCE_CLASSES),
      names(SOURCE_CLASSES))}
  test = _pick(*target["test"], TARGET_CLASSES, test_per_class)
  for kind, style in (("similar", lambda x: x), ("different", sketch)):
    for size, per_class in (("small", small_per_class), ("large", large_per_class)):
      images, labels = _pick(*target["train"], TARGET_CLASSES, per_class)
      tasks[f"{kind}_{size}"] = Dataset(
          f"shapes-{kind}-{size}", (style(images), labels), (style(test[0]), test[1]),
          len(TARGET_CLASSES), names(TARGET_CLASSES))
  return tasks
