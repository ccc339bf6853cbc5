"""Datasets held whole in memory, and the on-device input pipeline.

`load_dataset(name)` returns a `Dataset` of uint8 NHWC images and int32 labels:
the built-in procedural `shapes` set (offline, made in seconds) and its
multi-label and regression variants; mnist,
fashion_mnist, cifar10 and cifar100 read from their canonical files
(`jdl.data.classic`, no TensorFlow, see docs/data.md); or any other TFDS
image-classification dataset read through `tfds.data_source` (no TensorFlow at
train time). `jdl.data.pipeline` does shuffling, batching, normalisation and
augmentation on the device, inside the jitted step.
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np

from jdl.errors import ConfigError

# inputs (N, ...) -- uint8 images (N, H, W, C) or float32 sequences (N, T, F) --
# and labels: int32 class ids (N,), int32 multi-hot rows (N, C) or float32 targets (N,).
Split = Tuple[np.ndarray, np.ndarray]

# What a dataset's labels are (`Dataset.label_type`); `jdl.heads` says which head learns which.
LABEL_TYPES = ("class", "multi_hot", "value")


@dataclasses.dataclass
class Dataset:
  """A dataset held in host memory: classes, multi-hot labels or regression targets.

  Arguments:
    name: the dataset's name as given to `load_dataset`.
    train: (images, labels) for training (validation is split off later).
    test: (images, labels) held out for the final figure.
    num_classes: what the labels range over: for 'class' labels the number of
      classes (ids in [0, num_classes); 2 for a binary set such as
      fashion_mnist_footwear), for 'multi_hot' the number of labels (the
      row length), for 'value' the number of targets per example (1).
    class_names: one name per class, label or target.
    label_type: 'class' (int32 ids (N,)), 'multi_hot' (int32 0/1 (N,
      num_classes), any number of ones) or 'value' (float32 (N,)).
  """
  name: str
  train: Split
  test: Split
  num_classes: int
  class_names: Tuple[str, ...]
  label_type: str = "class"

  @property
  def input_shape(self) -> Tuple[int, ...]:
    """One example's shape: (H, W, C) for images, (T, F) for sequences."""
    return tuple(self.train[0].shape[1:])


def load_dataset(name: str, *, data_dir: Optional[str] = None,
                 num_train: Optional[int] = None, num_test: Optional[int] = None,
                 seed: int = 0, download: bool = True) -> Dataset:
  """Loads a dataset by name into host memory.

  Arguments:
    name: 'shapes' or its easy variant 'shapes_plain' (built in, offline),
      'shapes_multilabel' (1-3 shapes of distinct classes per image, multi-hot
      labels) and 'shapes_size' (the shapes_plain images, target: the shape's
      radius in pixels),
      'mnist1d' (sequences, made locally), 'mnist', 'fashion_mnist', 'cifar10',
      'cifar100' (`jdl.data.classic`), 'fashion_mnist_footwear' (Fashion-MNIST
      with two classes: 1 for Sandal, Sneaker and Ankle boot, 0 for the rest) or
      another TFDS image-classification name (svhn_cropped, ...).
    data_dir: searched first for the classic datasets' files; where TFDS looks for
      prepared data (TFDS's default when None).
    num_train: for `shapes`, how many training images to generate; otherwise
      keep only the first `num_train` training examples. None: all / default.
    num_test: likewise for the test split.
    seed: seed of the `shapes` generator (other data does not depend on it).
    download: allow downloading data that is not there yet (TFDS also prepares it).
  """
  if name in SHAPES_VARIANTS:
    from jdl.data import shapes
    task = SHAPES_VARIANTS[name]
    splits = shapes.load(num_train=num_train or 10_000, num_test=num_test or 2_000, seed=seed,
                         plain=name != "shapes", task=task)  # the heads' variants are plain too
    if task == "size":
      return Dataset(name, splits["train"], splits["test"], 1, ("radius_px",), "value")
    return Dataset(name, splits["train"], splits["test"], len(shapes.CLASS_NAMES),
                   tuple(shapes.CLASS_NAMES), "multi_hot" if task == "multilabel" else "class")
  from jdl.data import classic
  if name == "fashion_mnist_footwear":
    dataset = classic.load("fashion_mnist", data_dir=data_dir, download=download)
    footwear = [dataset.class_names.index(c) for c in FOOTWEAR]
    relabel = lambda split: (split[0], np.isin(split[1], footwear).astype(np.int32))
    dataset = Dataset(name, relabel(dataset.train), relabel(dataset.test), 2,
                      ("not footwear", "footwear"))
  elif name == "mnist1d":
    from jdl.data import mnist1d
    splits = mnist1d.load()  # The standard dataset whatever the run's seed.
    dataset = Dataset("mnist1d", splits["train"], splits["test"], 10, mnist1d.CLASS_NAMES)
  elif name in classic.DATASETS:  # The canonical files, no TensorFlow.
    dataset = classic.load(name, data_dir=data_dir, download=download)
  else:
    from jdl.data import tfds_source
    dataset = tfds_source.load(name, data_dir=data_dir, download=download)
  if num_train:
    dataset.train = tuple(a[:num_train] for a in dataset.train)
  if num_test:
    dataset.test = tuple(a[:num_test] for a in dataset.test)
  return dataset


SHAPES_VARIANTS = {"shapes": "class", "shapes_plain": "class", "shapes_multilabel": "multilabel",
                   "shapes_size": "size"}
FOOTWEAR = ("Sandal", "Sneaker", "Ankle boot")  # fashion_mnist_footwear's class 1 (30% of the images)

# The labels of the built-in datasets, (label_type, num_classes), known without
# loading them, so `config.validate` can refuse a head that cannot learn them
# before anything loads (other names are checked once loaded).
KNOWN_LABELS = {
    **{name: ("class", 10) for name in ("shapes", "shapes_plain", "mnist", "fashion_mnist",
                                         "cifar10", "mnist1d")},
    "cifar100": ("class", 100), "fashion_mnist_footwear": ("class", 2),
    "shapes_multilabel": ("multi_hot", 10), "shapes_size": ("value", 1),
}


def split_validation(split: Split, fraction: float, seed: int) -> Tuple[Split, Split]:
  """Holds a random `fraction` of a split out as validation data.

  The split is stratified-free but seeded, so the same seed always holds out the
  same examples (needed for exact resume).

  Arguments:
    split: (images, labels).
    fraction: in [0, 1); 0 gives an empty validation split.
    seed: which examples are held out.
  """
  images, labels = split
  if not 0.0 <= fraction < 1.0:
    raise ConfigError(f"validation_fraction must be in [0, 1), got {fraction}")
  num_val = int(round(len(labels) * fraction))
  order = np.random.default_rng(seed).permutation(len(labels))
  val, train = order[:num_val], order[num_val:]
  return (images[train], labels[train]), (images[val], labels[val])
