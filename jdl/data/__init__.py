"""Datasets held whole in memory, and the on-device input pipeline.

`load_dataset(name)` returns a `Dataset` of uint8 NHWC images and int32 labels:
the built-in procedural `shapes` set (offline, made in seconds); mnist,
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
# and int32 labels (N,).
Split = Tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class Dataset:
  """A classification dataset held in host memory.

  Arguments:
    name: the dataset's name as given to `load_dataset`.
    train: (images, labels) for training (validation is split off later).
    test: (images, labels) held out for the final figure.
    num_classes: number of classes; labels are in [0, num_classes).
    class_names: one name per class.
  """
  name: str
  train: Split
  test: Split
  num_classes: int
  class_names: Tuple[str, ...]

  @property
  def input_shape(self) -> Tuple[int, ...]:
    """One example's shape: (H, W, C) for images, (T, F) for sequences."""
    return tuple(self.train[0].shape[1:])

  image_shape = input_shape  # The name the image experiments read best with.


def load_dataset(name: str, *, data_dir: Optional[str] = None,
                 num_train: Optional[int] = None, num_test: Optional[int] = None,
                 seed: int = 0, download: bool = True) -> Dataset:
  """Loads a dataset by name into host memory.

  Arguments:
    name: 'shapes' or its easy variant 'shapes_plain' (built in, offline), 'mnist1d'
      (sequences, made locally), 'mnist', 'fashion_mnist', 'cifar10', 'cifar100'
      (`jdl.data.classic`) or another TFDS image-classification name (svhn_cropped, ...).
    data_dir: searched first for the classic datasets' files; where TFDS looks for
      prepared data (TFDS's default when None).
    num_train: for `shapes`, how many training images to generate; otherwise
      keep only the first `num_train` training examples. None: all / default.
    num_test: likewise for the test split.
    seed: seed of the `shapes` generator (other data does not depend on it).
    download: allow downloading data that is not there yet (TFDS also prepares it).
  """
  if name in ("shapes", "shapes_plain"):
    from jdl.data import shapes
    splits = shapes.load(num_train=num_train or 10_000, num_test=num_test or 2_000, seed=seed,
                         plain=name == "shapes_plain")
    return Dataset(name, splits["train"], splits["test"], len(shapes.CLASS_NAMES),
                   tuple(shapes.CLASS_NAMES))
  from jdl.data import classic
  if name == "mnist1d":
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
