"""Pretrained weights into a new model: from a jdl workdir, a .safetensors ResNet, or a run."""
import dataclasses
import json
import os
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdl import checkpoint, models, train
from jdl.config import TrainConfig, load_run_config
from jdl.errors import CheckpointError


def restore_matching(target: dict, source: dict, into: Optional[str] = "backbone",
                     where: str = "the pretrained weights") -> dict:
  """Copies pretrained arrays into `target` for every leaf under `into`.

  Every parameter and BatchNorm statistic of the target's `into` submodule must
  exist in `source` with the same shape; `source` may have more (the layers a
  cut removed, the old head), which are left out. Leaves outside `into` (the new
  head) keep their target values.

  Arguments:
    target: the new model's variables, e.g. from `init_variables`.
    source: the pretrained model's variables {'params': ..., 'batch_stats': ...}.
    into: the target submodule that holds the pretrained model ('backbone' in a
      TransferModel); None when target and source are the same architecture.
    where: how to name the source in messages.
  Raises:
    CheckpointError naming the parameter path and both shapes.
  """
  restored = {}
  # Parameters before statistics, kernels before vectors: the first mismatch
  # named is the one a user recognises.
  for collection in sorted(target, key=lambda c: c != "params"):
    flat = traverse_util.flatten_dict(dict(target[collection]))
    have = traverse_util.flatten_dict(dict(source.get(collection, {})))
    for key in sorted(flat, key=lambda k: np.ndim(flat[k]) < 2):
      leaf = flat[key]
      if into is not None and key[0] != into:
        continue
      source_key = key[1:] if into is not None else key
      path = f"{collection}/{'/'.join(key)}"
      source_path = f"{collection}/{'/'.join(source_key)}"
      if source_key not in have:
        raise CheckpointError(f"{where} have no {source_path}, which the model's {path} "
                              f"{tuple(np.shape(leaf))} needs")
      value = np.asarray(have[source_key])
      if value.shape != tuple(np.shape(leaf)):
        raise CheckpointError(f"{where} do not fit: {source_path} is {value.shape} there but "
                              f"{path} is {tuple(np.shape(leaf))} in the model")
      flat[key] = value.astype(np.asarray(leaf).dtype)
    restored[collection] = traverse_util.unflatten_dict(flat)
  return restored


@dataclasses.dataclass
class Pretrained:
  """A pretrained model: how to build it, and its variables.

  Arguments:
    model: the pretrained model (its head included; cut it with `cut_model`).
    variables: {'params': ..., 'batch_stats': ...} as numpy arrays.
    source: where it came from, for logs and results.json.
    test_accuracy: on its own task, when known.
    input_stats: (mean, std) per channel, in [0, 1] image units, that the
      model's inputs were normalised with when it was trained; None if unknown.
    input_shape: one example's shape it was trained on; None if unknown.
    path: the workdir or file it came from (default: `source`).
  """
  model: nn.Module
  variables: dict
  source: str
  test_accuracy: Optional[float] = None
  input_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None
  input_shape: Optional[Tuple[int, ...]] = None
  path: Optional[str] = None

  def __post_init__(self):
    self.path = os.path.abspath(self.path or self.source)


# torchvision's ImageNet preprocessing (transforms.Normalize), [0, 1] units.
IMAGENET_STATS = (np.array([0.485, 0.456, 0.406], np.float32),
                  np.array([0.229, 0.224, 0.225], np.float32))


def _recorded_stats(saved: dict) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, std) from a classifier run's config.json."""
  return (np.asarray(saved["input_mean"], np.float32), np.asarray(saved["input_std"], np.float32))


def _saved_config(workdir: str) -> Tuple[TrainConfig, int, dict]:
  """The run's TrainConfig, class count and raw config.json."""
  config, saved = load_run_config(workdir, "pretrained_workdir")
  return config, int(saved["num_classes"]), saved


def load_workdir(workdir: str, dtype=jnp.float32) -> Pretrained:
  """The best (else latest) parameters of an experiments.cifar or sequence run.

  The model is rebuilt from the run's config.json; the checkpoint is read
  without a target structure.
  """
  config, num_classes, saved = _saved_config(workdir)
  found = checkpoint.restore_arrays(workdir)
  if found is None:
    raise CheckpointError(f"--pretrained_workdir {workdir} has no checkpoint yet")
  (state, _), step = found
  variables = {k: state[k] for k in ("params", "batch_stats") if state.get(k) is not None}
  config = dataclasses.replace(config, precision="bfloat16" if dtype == jnp.bfloat16 else "float32")
  model = train.build_classifier(config, num_classes)
  accuracy = None
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      accuracy = json.load(f).get("test_accuracy")
  except (OSError, ValueError):
    pass
  return Pretrained(model, variables, f"{workdir} ({config.model}, step {step})", accuracy,
                    _recorded_stats(saved), tuple(saved["input_shape"]), workdir)


def load_safetensors_resnet(path: str, model_name: str, input_shape: Sequence[int],
                            dtype=jnp.float32) -> Pretrained:
  """A torchvision-layout ResNet state dict (.safetensors) as a jdl model.

  The stem ('imagenet' for a 7x7 conv1, 'cifar' for 3x3) and the class count
  are read from the file's conv1.weight and fc.weight.
  """
  from jdl import pretrained
  tensors = pretrained.load_safetensors(path)
  for key in ("conv1.weight", "fc.weight"):
    if key not in tensors:
      raise CheckpointError(f"{path} is not a torchvision ResNet state dict (no {key})")
  stem = "imagenet" if tensors["conv1.weight"].shape[-1] == 7 else "cifar"
  num_classes = int(tensors["fc.weight"].shape[0])
  model = models.build_model(model_name, stem=stem, num_classes=num_classes, dtype=dtype)
  variables = pretrained.torch_to_jdl(tensors, model, input_shape)
  return Pretrained(model, jax.device_get(variables), f"{path} ({model_name}, stem {stem})",
                    input_stats=IMAGENET_STATS, path=path)  # torchvision's weights expect ImageNet-normalised inputs
