"""TFDS classification datasets (images, fixed-length sequences), read without TensorFlow.

Prepared data is read through `tfds.data_source` (ArrayRecord files, random
access, no TensorFlow import). Data that is not prepared yet is downloaded and
prepared once with `download_and_prepare(file_format='array_record')`, which
does need TensorFlow: the `prepare` extra installs it. With neither data nor
network, `load` fails at once with a `DataError` that names the dataset, the
directory searched and the ways out -- it never hangs on retries.
"""
import importlib.util
import os
import sys
import urllib.parse
from typing import Optional

import numpy as np

from jdl.data import locations
from jdl.errors import DataError


def default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def network_available(url: Optional[str]) -> bool:
  """True if a TCP connection to `url`'s host (port 443) opens within the timeout.

  When $JDL_DATA_MIRROR is set (see `jdl.data.locations`) the mirror must
  answer first: the tests point it at a dead loopback port, so this probe never
  leaves the machine under test.
  """
  if locations.mirror() and not locations.host_answers(locations.mirror()):
    return False
  host = urllib.parse.urlparse(url or "").hostname or "storage.googleapis.com"
  return locations.host_answers(f"https://{host}/")


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _builder(name: str, data_dir: str,
             kind: str = "image-classification dataset such as cifar10, cifar100, mnist, "
                         "fashion_mnist"):
  import tensorflow_datasets as tfds
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    builtin = "" if kind.startswith("text") else "'shapes', 'shapes_plain' (built in, offline) or "
    raise DataError(f"unknown dataset {name!r}: use {builtin}a TFDS {kind}") from None


def _prepare(builder, name: str, data_dir: str, offline: str = "--dataset=shapes") -> None:
  """Downloads and converts to ArrayRecord, or says clearly why it cannot.

  Arguments:
    offline: the flag that runs without this dataset, named in the errors.
  """
  how = f"put a prepared copy of {name!r} under --data_dir, or run offline with {offline}"
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


def _read_all(source, key: str, dtype) -> tuple:
  """Decodes every record of a data source into (inputs, labels int32)."""
  from tqdm import tqdm
  records = (source[i] for i in range(len(source)))
  inputs, labels = [], []
  for record in tqdm(records, total=len(source), desc="reading", unit="ex",
                     mininterval=2.0, disable=len(source) < 20_000 or not sys.stderr.isatty(),
                     leave=False):
    inputs.append(record[key])
    labels.append(record["label"])
  return np.stack(inputs).astype(dtype), np.asarray(labels, np.int32)


def _input_feature(name: str, features) -> tuple:
  """(key, numpy dtype, per-example shape) of the classifier's input feature.

  'image' (uint8) when there is one; otherwise the one non-label feature with a
  fixed, fully known shape and a numeric dtype -- a fixed-length sequence
  (T,) or (T, F), which is read as (T, 1) or (T, F) float32.
  """
  if "image" in features:
    return "image", np.uint8, tuple(features["image"].shape)
  candidates = []
  for key, feature in features.items():
    if key == "label":
      continue
    shape = getattr(feature, "shape", None)
    dtype = np.dtype(getattr(feature, "np_dtype", None) or np.object_)
    if (shape and all(isinstance(d, int) for d in shape) and len(shape) in (1, 2)
        and (np.issubdtype(dtype, np.number) or dtype == np.bool_)):
      candidates.append(key)
  if len(candidates) != 1:
    raise DataError(
        f"dataset {name!r} does not fit a classifier here: it needs a 'label' feature and "
        "either an 'image' or exactly one fixed-length numeric sequence feature "
        f"(it has {', '.join(sorted(features.keys()))})")
  key = candidates[0]
  return key, np.float32, tuple(features[key].shape)


def load(name: str, *, data_dir: Optional[str] = None, download: bool = True):
  """Loads a TFDS classification dataset whole into memory.

  The input is the 'image' feature (uint8, (H, W, C)) or else the one
  fixed-length numeric feature, as float32 (T, F) sequences (see `_input_feature`).

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
  if "label" not in features:
    raise DataError(f"dataset {name!r} is not a classification dataset (it has no 'label' feature)")
  key, dtype, _ = _input_feature(name, features)
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
  train, test = (_read_all(s, key, dtype) for s in sources)
  if train[0].ndim == 2:  # (N, T) sequences -> (N, T, 1), one feature per step
    train, test = ((x[..., None], y) for x, y in (train, test))
  label = features["label"]
  return Dataset(name, train, test, label.num_classes, tuple(label.names))


def load_text(name: str, *, data_dir: Optional[str] = None, download: bool = True):
  """Loads a TFDS text dataset (a 'text' feature, e.g. tiny_shakespeare) as strings.

  Arguments:
    name: the TFDS name, optionally with config/version.
    data_dir: where prepared data is looked for and written (TFDS default if None).
    download: allow downloading and preparing when the data is not there.
  Returns:
    (train, validation): each split's records joined into one string; validation
    is '' when the dataset has no 'validation' split.
  """
  import tensorflow_datasets as tfds
  data_dir = data_dir or default_data_dir()
  builder = _builder(name, data_dir, kind="text dataset with a 'text' feature, such as tiny_shakespeare")
  if "text" not in builder.info.features:
    raise DataError(f"dataset {name!r} has no 'text' feature; use a text dataset such as "
                    "tiny_shakespeare, or --text_file")
  splits = ["train"] + (["validation"] if "validation" in builder.info.splits else [])
  try:
    sources = tfds.data_source(name, split=splits, data_dir=data_dir, download=False)
  except Exception:  # Not prepared (TFDS raises several types for this).
    if not download:
      raise DataError(f"dataset {name!r} is not prepared in {data_dir}; "
                      "allow downloading or use --text_file") from None
    _prepare(builder, name, data_dir, offline="--text_file (the default text needs no data)")
    sources = tfds.data_source(name, split=splits, data_dir=data_dir, download=False)

  def join(source):
    texts = (source[i]["text"] for i in range(len(source)))
    return "".join(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)
  texts = [join(s) for s in sources]
  return texts[0], (texts[1] if len(texts) > 1 else "")
