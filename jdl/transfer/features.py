"""Bottleneck features: the frozen part run once over the data, cached without pickle."""
import hashlib
import os
import zipfile
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdl import xla
from jdl.data import pipeline
from jdl.errors import CheckpointError
from jdl.parallel import is_primary
from jdl.transfer.model import TransferModel


def bottleneck_features(model: TransferModel, variables: dict, images: np.ndarray,
                        mean, std, batch_size: int = 500) -> np.ndarray:
  """The frozen backbone's output for every image, float32 (N, *feature shape).

  Arguments:
    model: a TransferModel (only its backbone runs, in inference mode).
    variables: its variables.
    images: (N, H, W, C) uint8.
    mean, std: the per-channel input normalisation of training.
    batch_size: images per compiled call (the last batch is padded).
  """
  backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}

  @xla.jit
  def features(x):
    x = pipeline.normalize(x, mean, std, model.dtype)
    _, out = model.backbone.apply(backbone_vars, x, train=False)
    return out[model.backbone.cut_at].astype(jnp.float32)

  batch_size = min(batch_size, len(images))
  outputs = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(features(batch))[:batch_size - pad])
  return np.concatenate(outputs)


def fingerprint(*arrays_or_trees) -> str:
  """sha256 of the bytes of every array in the arguments (pytrees allowed)."""
  digest = hashlib.sha256()
  for item in arrays_or_trees:
    for leaf in jax.tree.leaves(item):
      leaf = np.ascontiguousarray(np.asarray(leaf))
      digest.update(str((leaf.shape, leaf.dtype.str)).encode())
      digest.update(leaf.tobytes())
  return digest.hexdigest()


class FeatureCache:
  """Named float arrays in one uncompressed .npz, plus their fingerprint.

  Read with `np.load(allow_pickle=False)`: a file holding a pickle (or object
  arrays) is refused, never unpickled. A cache whose fingerprint differs from
  the one asked for (other weights, cut or data) is stale and recomputed.

  Arguments:
    path: the .npz file, e.g. WORKDIR/features.npz.
  """

  def __init__(self, path: str):
    self.path = path

  def load(self, key: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays saved under fingerprint `key`; None when absent or stale."""
    if not os.path.exists(self.path):
      return None
    try:
      with np.load(self.path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
      raise CheckpointError(f"feature cache {self.path} is damaged or not a NumPy archive "
                            f"({type(e).__name__}: {str(e)[:120]}); jdl never loads pickle. "
                            "Delete it to recompute the features") from None
    stored = arrays.pop("fingerprint", np.array("")).item()
    return arrays if stored == key else None

  def save(self, key: str, arrays: Dict[str, np.ndarray]) -> None:
    """Writes atomically (temp file + rename): never a half-written cache. Only
    process 0 of a multi-host run writes (the processes share the workdir)."""
    if not is_primary():
      return
    tmp = self.path + ".tmp.npz"
    np.savez(tmp, fingerprint=np.array(key), **arrays)
    os.replace(tmp, self.path)
