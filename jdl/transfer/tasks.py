"""Transfer task families: a source task to pretrain on, similar and different
targets, each with a small and a large training set.

  shapes          offline: shapes classes 0-4 -> classes 5-9 in the same
                  style (similar) and as line sketches (different).
  fashion_mnist   real: Fashion-MNIST's T-shirt/top, Trouser, Pullover, Dress,
                  Coat -> Sandal, Shirt, Sneaker, Bag, Ankle boot (similar);
                  shapes classes 5-9 drawn grey at 28x28 (different).

`FAMILIES` names them for experiments.transfer's --dataset; each builds a dict
of Datasets with keys source, similar_small, similar_large, different_small,
different_large.
"""
import dataclasses
from typing import Callable, Dict, Optional

import numpy as np

from jdl.data import Dataset, load_dataset, shapes
from jdl.registry import Registry


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


def grey(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, 3) -> uint8 (N, H, W, 1): luminance, as Fashion-MNIST's images are."""
  luminance = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (N, H, W)
  return np.round(luminance)[..., None].astype(np.uint8)


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


FASHION_SOURCE = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
FASHION_TARGET = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot


def fashion_mnist_tasks(seed: int = 0, source_per_class: Optional[int] = None, small_per_class: int = 50,
                        large_per_class: Optional[int] = None, test_per_class: Optional[int] = None, *,
                        data_dir: Optional[str] = None, download: bool = True) -> Dict[str, Dataset]:
  """The real-image transfer family, each a 5-class Dataset of 28x28x1 images.

  'source': Fashion-MNIST's T-shirt/top, Trouser, Pullover, Dress, Coat (all
  6,000 training images of each by default). 'similar_small'/'similar_large':
  its other five classes, Sandal, Shirt, Sneaker, Bag, Ankle boot: photos of
  the same kind, made the same way, of other garments. 'different_small'/
  'different_large': no clothing at all: the shapes classes cross, star,
  crescent, heart and bar (`jdl.data.shapes`, procedural, not real photos),
  rendered at 28x28 on textured backgrounds with distractors and noise, and
  turned grey, so only their input shape matches Fashion-MNIST's. (MNIST digits
  would be a real different target, but have no Debian package.)

  Fashion-MNIST's images are already shuffled: a set keeps the first
  `per_class` images of each class (None: all), so the small set is the start
  of the large one. Every target is tested on `test_per_class` test images per
  class (None: all 1,000 of Fashion-MNIST's; as many shapes).

  Arguments:
    seed: seed of the shapes images (Fashion-MNIST does not depend on it).
    source_per_class, small_per_class, large_per_class, test_per_class:
      images per class of each set (None: all).
    data_dir, download: where Fashion-MNIST is looked for (`load_dataset`).
  """
  data = load_dataset("fashion_mnist", data_dir=data_dir, download=download)
  all_train, all_test = (int(np.bincount(split[1]).min()) for split in (data.train, data.test))  # 6,000, 1,000
  source_per_class, large_per_class = source_per_class or all_train, large_per_class or all_train
  test_per_class = test_per_class or all_test
  names = lambda classes: tuple(data.class_names[c] for c in classes)
  tasks = {"source": Dataset("fashion_mnist-source", _pick(*data.train, FASHION_SOURCE, source_per_class),
                             _pick(*data.test, FASHION_SOURCE, test_per_class), len(FASHION_SOURCE),
                             names(FASHION_SOURCE))}
  test = _pick(*data.test, FASHION_TARGET, test_per_class)
  for size, per_class in (("small", small_per_class), ("large", large_per_class)):
    tasks[f"similar_{size}"] = Dataset(f"fashion_mnist-similar-{size}",
                                       _pick(*data.train, FASHION_TARGET, per_class), test,
                                       len(FASHION_TARGET), names(FASHION_TARGET))
  # As many shapes per class as the similar sets have garments.
  train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
  shapes_train = shapes.generate(10 * large_per_class, train_seed, image_size=28)
  images, labels = _pick(*shapes.generate(10 * test_per_class, test_seed, image_size=28), TARGET_CLASSES,
                         test_per_class)
  shapes_test = (grey(images), labels)
  for size, per_class in (("small", small_per_class), ("large", large_per_class)):
    images, labels = _pick(*shapes_train, TARGET_CLASSES, per_class)
    tasks[f"different_{size}"] = Dataset(
        f"shapes_grey28-different-{size}", (grey(images), labels), shapes_test, len(TARGET_CLASSES),
        tuple(shapes.CLASS_NAMES[c] for c in TARGET_CLASSES))
  return tasks


@dataclasses.dataclass(frozen=True)
class TaskFamily:
  """A transfer task family: how to build it and its default set sizes.

  Arguments:
    build: (seed, source_per_class, small_per_class, large_per_class,
      test_per_class, data_dir=, download=) -> {'source', 'similar_small', ...}.
    sizes: the per-class defaults of experiments.transfer's size flags.
  """
  build: Callable[..., Dict[str, Dataset]]
  sizes: Dict[str, int]


FAMILIES = Registry("transfer task family")
FAMILIES.register("shapes", TaskFamily(
    lambda seed, *sizes, data_dir=None, download=True: shapes_tasks(seed, *sizes),
    dict(source_per_class=1000, small_per_class=50, large_per_class=500, test_per_class=200)))
# Fashion-MNIST has 6,000 training and 1,000 test images per class: all of them.
FAMILIES.register("fashion_mnist", TaskFamily(
    fashion_mnist_tasks,
    dict(source_per_class=6000, small_per_class=50, large_per_class=6000, test_per_class=1000)))
