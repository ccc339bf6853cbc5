"""TFDS image-classification datasets, read without TensorFlow.

Prepared data is read through `tfds.data_source` (ArrayRecord files, random
access, no TensorFlow import). Data that is not prepared yet is downloaded and
prepared once with `download_and_prepare(file_format='array_record')`, which
does need TensorFlow: the `prepare` extra installs it. With neither data nor
network, `load` fails at once with a `DataError` that names the dataset, the
directory searched and the ways out -- it never hangs on retries.
"""
import importlib.util
import os
import socket
import sys
import urllib.parse
from typing import Optional

import numpy as np

from jdl.errors import DataError

# Seconds to wait for a TCP connection before calling the network unreachable.
NETWORK_TIMEOUT_S = 3.0


def default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def network_available(url: Optional[str]) -> bool:
  """True if a TCP connection to `url`'s host can be opened within the timeout."""
  host = urllib.parse.urlparse(url or "").hostname or "storage.googleapis.com"
  try:
    socket.create_connection((host, 443), timeout=NETWORK_TIMEOUT_S).close()
    return True
  except OSError:
    return False


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f"unknown dataset {name!r}: use 'shapes' (built in, offline) or a TFDS "
        "image-classification dataset such as cifar10, cifar100, mnist, fashion_mnist"
    ) from None


def _prepare(builder, name: str, data_dir: str) -> None:
  """Downloads and converts to ArrayRecord, or says clearly why it cannot."""
  how = (f"put a prepared copy of {name!r} under --data_dir, or run offline "
         "with --dataset=shapes")
  if not network_available(builder.info.homepage):
    raise DataError(
        f"dataset {name!r} is not prepared in {data_dir} and the network is "
        f"unreachable, so it cannot be downloaded; {how}")
  if not tensorflow_available():
    raise DataError(
        f"dataset {name!r} is not prepared in {data_dir}; preparing it needs "
        "TensorFlow: pip install -e '.[prepare]' (or pip install tensorflow), "
        f"or {how}")
  print(f"Downloading and preparing {name} into {data_dir} (once) ...", file=sys.stderr)
  builder.download_and_prepare(file_format="array_record")


def _read_all(source) -> tuple:
  """Decodes every record of a data source into (images uint8, labels int32)."""
  from tqdm import tqdm
  records = (source[i] for i in range(len(source)))
  images, labels = [], []
  for record in tqdm(records, total=len(source), desc="reading", unit="ex",
                     mininterval=2.0, disable=len(source) < 20_000, leave=False):
    images.append(record["image"])
    labels.append(record["label"])
  return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)


def load(name: str, *, data_dir: Optional[str] = None, download: bool = True):
  """Loads a TFDS image-classification dataset whole into memory.

  Arguments:
    name: the TFDS name, optionally with config/version ('cifar10', 'mnist:3.*').
    data_dir: where prepared data is looked for and written (TFDS default if None).
    download: allow downloading and preparing when the data is not there.
  Returns:
    A `jdl.data.Dataset`.
  """
  import tensorflow_datasets as tfds
  from jdl.data import Dataset
  data_dir = data_dir or default_data_dir()
  builder = _builder(name, data_dir)
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"dataset {name!r} is not an image-classification dataset "
                    "(it needs 'image' and 'label' features)")
  splits = builder.info.splits
  test_split = "test" if ("test" in splits or not splits) else "validation"
  try:
    sources = tfds.data_source(name, split=["train", test_split], data_dir=data_dir,
                               download=False)
  except Exception:  # Not prepared (TFDS raises several types for this).
    if not download:
      raise DataError(f"dataset {name!r} is not prepared in {data_dir}; "
                      "allow downloading or use --dataset=shapes") from None
    _prepare(builder, name, data_dir)
    sources = tfds.data_source(name, split=["train", test_split], data_dir=data_dir,
                               download=False)
  train, test = (_read_all(s) for s in sources)
  label = features["label"]
  return Dataset(name, train, test, label.num_classes, tuple(label.names))
