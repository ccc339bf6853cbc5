"""MNIST-1D (Greydanus, 2020): ten 1-D digit templates, transformed; made locally.

The `mnist1d` package generates the dataset from its templates with the
standard settings (5,000 sequences of length 40, split 4,000 train / 1,000
test, seed 42), so the published baselines apply: logistic regression 32%,
MLP 68%, CNN 94%, GRU 91% test accuracy. It is built from scratch with
`make_dataset`, never downloaded or read from the package's pickle cache.

  splits = load()  # {'train': (x float32 (4000, 40, 1), y int32), 'test': ...}

Generating takes several seconds, so the arrays are cached as an .npz in
$JDL_DATA_CACHE (default ~/.cache/jdl/data) and read back with
allow_pickle=False; a cache file that does not read cleanly is regenerated.
"""
import os
from typing import Dict, Tuple

import numpy as np

from jdl.data.locations import cache_dir

CLASS_NAMES = tuple(str(d) for d in range(10))
SEQUENCE_LENGTH = 40


def load(seed: int = 42) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """The standard MNIST-1D splits as float32 (N, 40, 1) sequences and int32 labels.

  Arguments:
    seed: the generator's seed; 42 is the published dataset.
  """
  path = os.path.join(cache_dir(), f"mnist1d_seed{seed}.npz")
  keys = ("x_train", "y_train", "x_test", "y_test")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in keys}
    return {"train": (arrays["x_train"], arrays["y_train"]),
            "test": (arrays["x_test"], arrays["y_test"])}
  except (OSError, KeyError, ValueError):
    pass  # Missing or damaged: generate (and cache) it.
  splits = generate(seed)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, x_train=splits["train"][0], y_train=splits["train"][1],
             x_test=splits["test"][0], y_test=splits["test"][1])
    os.replace(tmp, path)
  except OSError:
    pass  # A read-only cache only costs the regeneration next time.
  return splits


def generate(seed: int = 42) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Builds the splits with the `mnist1d` package (no cache); see `load`."""
  from mnist1d.data import get_dataset_args, make_dataset
  args = get_dataset_args()
  args.seed = seed
  state = np.random.get_state()  # make_dataset reseeds NumPy's global RNG; put it back.
  try:
    data = make_dataset(args)
  finally:
    np.random.set_state(state)
  as_split = lambda x, y: (np.asarray(x, np.float32)[..., None], np.asarray(y, np.int32))
  return {"train": as_split(data["x"], data["y"]), "test": as_split(data["x_test"], data["y_test"])}
