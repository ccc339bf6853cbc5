"""Transfer learning: the course notes' four scenarios and bottleneck features.

A pretrained network is adjusted to a new dataset in one of four ways, chosen by
the new dataset's size and its similarity to the original one:

  small_similar    drop the last layer, add a new Dense head for the new classes,
                   freeze every pretrained weight, train the head.
  small_different  also cut away the later pretrained layers (the hidden Dense
                   layers, else the later half), keep the earlier ones frozen,
                   add the new head (flatten or GAP, then Dense).
  large_similar    new head, the rest initialised from the pretrained weights,
                   fine-tune everything.
  large_different  new head and train from scratch, or fine-tune from the
                   pretrained weights (`fine_tune_from_pretrained`).

The pieces:
  TransferModel       a pretrained model cut at a named feature (its `cut_at`
                      field: later layers are never created) + a new `Head`.
  restore_matching    puts pretrained arrays into a new model's variables,
                      naming the parameter path and both shapes on a mismatch.
  Pretrained          a model's config and variables, from an experiments.cifar
                      workdir, a .safetensors ResNet or a fresh pretraining run.
  bottleneck_features / FeatureCache
                      the frozen part run once over the data, its outputs kept
                      in WORKDIR as a NumPy archive (never pickle) to train the
                      head on.
  shapes_tasks        the offline demonstration: source task shapes classes 0-4;
                      similar target classes 5-9 in the same style; different
                      target classes 5-9 as line sketches; small and large sets.
  run                 experiments.transfer: pretrain (or load), run the
                      scenarios and their from-scratch baselines, write a table.

Freezing itself is `jdl.optim.freeze` (optax multi_transform + set_to_zero) via
`jdl.train.fit(..., frozen=patterns)`, which also keeps the BatchNorm
statistics of frozen layers. A frozen backbone here also runs in inference
mode (BatchNorm uses its running statistics, dropout off, as Keras does for
layers with trainable=False) and sits behind stop_gradient, so no backward pass
goes through it.

    backbone = build_model('resnet20')                 # pretrained elsewhere
    model = TransferModel(backbone.clone(cut_at='layer2'), num_classes=5,
                          train_backbone=False)
    variables = restore_matching(init_variables(model, (32, 32, 3)), pretrained)
    state, results = train.fit(config, data, model=model, variables=variables,
                               frozen=FROZEN_BACKBONE)
"""
import dataclasses
import hashlib
import json
import math
import os
import time
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdl import checkpoint, models, train
from jdl.config import TrainConfig, load_run_config, option, validate as validate_train_config
from jdl.data import Dataset, load_dataset, pipeline, shapes, split_validation
from jdl.errors import CheckpointError, ConfigError
from jdl.logs import read_jsonl, write_json
from jdl.models import layers
from jdl.parallel import is_primary

SCENARIOS = ("small_similar", "small_different", "large_similar", "large_different")
FROZEN_BACKBONE = ("^backbone/",)  # freeze patterns of a fully frozen backbone


# ----------------------------------------------------------------------------
# Models: a cut backbone and a new head.
# ----------------------------------------------------------------------------

class Head(nn.Module):
  """The new classifier: global average pool (of feature maps), Dense 'fc'.

  Also the whole model of bottleneck training, so its parameters carry over
  into a TransferModel's 'head' unchanged.

  Arguments:
    num_classes: number of logits.
    pool: how feature maps become a vector: 'avg' (global average pooling,
      as in the notes' bottleneck head: C inputs) or 'flatten' (keeps where
      each pattern is: H * W * C inputs). Vectors pass unchanged.
    dropout: rate before each Dense layer.
    hidden: width of a hidden Dense + ReLU layer before 'fc' (the Keras
      bottleneck example's Dense(256)); 0 for none.
    dtype: compute dtype; logits come back float32.
  """
  num_classes: int
  pool: str = "avg"
  dropout: float = 0.0
  hidden: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """(B, H, W, C) feature maps or (B, C) vectors -> ((B, num_classes), features)."""
    if x.ndim == 4 and self.pool == "avg":
      x = layers.GlobalAvgPool(name="avgpool")(x)  # (B, C)
    elif x.ndim > 2:
      x = layers.Flatten(name="flatten")(x)  # (B, H * W * C)
    if self.hidden:
      x = nn.Dropout(self.dropout, deterministic=not train, name="hidden_dropout")(x)
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))  # (B, hidden)
    features = {"pre_logits": x}
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits.astype(jnp.float32), features


class TransferModel(nn.Module):
  """A pretrained model cut at `backbone.cut_at`, followed by a new `Head`.

  Parameters live under 'backbone/...' (the pretrained model's own names) and
  'head/fc/...' (and 'head/hidden/...').

  Arguments:
    backbone: a jdl model with `cut_at` set (see `cut_model`).
    num_classes: classes of the new task.
    train_backbone: False freezes it in inference mode: BatchNorm uses running
      statistics, dropout is off, and no gradient flows into it (pair it with
      `frozen=FROZEN_BACKBONE` in `train.fit` so the optimizer leaves it alone).
    head_pool: the Head's `pool`, 'avg' or 'flatten'.
    head_dropout: dropout rate before the new Dense layer(s).
    head_hidden: the Head's `hidden` width (0: one Dense layer).
    dtype: compute dtype of the head.
  """
  backbone: nn.Module
  num_classes: int
  train_backbone: bool = True
  head_pool: str = "avg"
  head_dropout: float = 0.0
  head_hidden: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, {'backbone': cut features, 'pre_logits'})."""
    _, features = self.backbone(x, train=train and self.train_backbone)
    cut = features[self.backbone.cut_at]
    if not self.train_backbone:
      cut = jax.lax.stop_gradient(cut)
    logits, head_features = Head(self.num_classes, pool=self.head_pool, dropout=self.head_dropout,
                                 hidden=self.head_hidden, dtype=self.dtype, name="head")(cut, train=train)
    return logits, {"backbone": cut, "pre_logits": head_features["pre_logits"]}


def feature_names(model: nn.Module, input_shape: Sequence[int]) -> List[str]:
  """Names a model can be cut at, input side first (nothing is computed)."""
  model = model.clone(cut_at=None) if "cut_at" in _fields(model) else model
  x = jnp.zeros((1, *input_shape), jnp.float32)
  names = []  # filled while tracing: a dict coming out of eval_shape has sorted keys

  def trace():
    features = model.init_with_output(jax.random.key(0), x)[0][1]
    names.extend(features)
    return features

  jax.eval_shape(trace)
  return names


def _fields(model: nn.Module) -> set:
  return {f.name for f in dataclasses.fields(model)}


def cut_model(model: nn.Module, cut_at: str, input_shape: Sequence[int]) -> nn.Module:
  """`model` stopping after feature `cut_at` (ConfigError naming the valid cuts)."""
  if "cut_at" not in _fields(model):
    raise ConfigError(f"{type(model).__name__} cannot be cut for transfer learning "
                      "(it has no cut_at field)")
  names = feature_names(model, input_shape)
  if cut_at not in names:
    raise ConfigError(f"--cut_at {cut_at!r} is not a layer of {type(model).__name__}; "
                      f"choose one of: {', '.join(names)}")
  return model.clone(cut_at=cut_at)


def default_cut(model: nn.Module, input_shape: Sequence[int], similar: bool) -> str:
  """'pre_logits' (drop the last layer) for similar data; for different data
  also cut away the later, task-specific layers.

  Those are the hidden Dense layers where the model has them: the cut is its
  last feature map (cnn 'block3', lenet5 'block2'). A model whose pooled
  features go straight into the last layer (ResNets, fastnet, vgg) is cut at a
  middle feature instead: resnet20 'layer1', resnet18 'layer2', vgg11 'block3',
  fastnet 'group1'.
  On the shapes sketches the cnn cut at 'block2' lost to training from
  scratch and 'block3' beat it (BUILD_NOTES.md, issue 4).
  """
  if similar:
    return "pre_logits"
  names = [n for n in feature_names(model, input_shape) if n != "pre_logits"]
  count = lambda cut_at: sum(math.prod(a.shape) for a in jax.tree.leaves(jax.eval_shape(
      model.clone(cut_at=cut_at).init, jax.random.key(0), jnp.zeros((1, *input_shape)))))
  if count("pre_logits") > count(names[-1]):  # hidden Dense layers after the last feature map
    return names[-1]
  return names[(len(names) - 1) // 2]


def init_variables(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict:
  """Fresh {'params', 'batch_stats'?} of `model` for (1, *input_shape) inputs, on the host."""
  key = jax.random.key(seed, impl=train.PRNG_IMPL)
  return jax.device_get(dict(train.init_variables(model, input_shape, key)))


# ----------------------------------------------------------------------------
# Pretrained weights into a new model.
# ----------------------------------------------------------------------------

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
  """
  model: nn.Module
  variables: dict
  source: str
  test_accuracy: Optional[float] = None
  input_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None


# torchvision's ImageNet preprocessing (transforms.Normalize), [0, 1] units.
IMAGENET_STATS = (np.array([0.485, 0.456, 0.406], np.float32),
                  np.array([0.229, 0.224, 0.225], np.float32))


def _recorded_stats(saved: dict) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(mean, std) from a run's config.json; None for runs of a jdl before it was recorded."""
  if "input_mean" not in saved or "input_std" not in saved:
    return None
  return (np.asarray(saved["input_mean"], np.float32), np.asarray(saved["input_std"], np.float32))


def _saved_config(workdir: str) -> Tuple[TrainConfig, int, dict]:
  """The run's TrainConfig, class count and raw config.json (class count from results.json
  for older runs)."""
  config, saved = load_run_config(workdir, "pretrained_workdir")
  num_classes = saved.get("num_classes")
  if not num_classes:  # config.json of runs before it was recorded; a finished run's results.json has it
    try:
      with open(os.path.join(workdir, "results.json")) as f:
        num_classes = json.load(f)["dataset"]["num_classes"]
    except (OSError, ValueError, KeyError, TypeError):
      raise ConfigError(f"--pretrained_workdir {workdir} does not record its class count "
                        "(an unfinished run of an older jdl); rerun it to finish") from None
  return config, int(num_classes), saved


def load_workdir(workdir: str, dtype=jnp.float32) -> Pretrained:
  """The best (else latest) parameters of an experiments.cifar run.

  The model is rebuilt from the run's config.json; its class count comes from
  the stored head, so the checkpoint is read without a target structure.
  """
  config, num_classes, saved = _saved_config(workdir)
  variables, step = None, None
  for sub in ("best", "checkpoints"):
    directory = os.path.join(workdir, sub)
    if os.path.isdir(directory):
      found = checkpoint.restore_arrays(directory)
      if found is not None:
        (state, _), step = found
        variables = {k: state[k] for k in ("params", "batch_stats") if state.get(k) is not None}
        break
  if variables is None:
    raise CheckpointError(f"--pretrained_workdir {workdir} has no checkpoint "
                          "(in best/ or checkpoints/)")
  config = dataclasses.replace(config, precision="bfloat16" if dtype == jnp.bfloat16 else "float32")
  model = train.build_classifier(config, num_classes)
  accuracy = None
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      accuracy = json.load(f).get("test_accuracy")
  except (OSError, ValueError):
    pass
  return Pretrained(model, variables, f"{workdir} ({config.model}, step {step})", accuracy,
                    _recorded_stats(saved))


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
                    input_stats=IMAGENET_STATS)  # torchvision's weights expect ImageNet-normalised inputs


# ----------------------------------------------------------------------------
# Bottleneck features: the frozen part run once, cached without pickle.
# ----------------------------------------------------------------------------

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

  @jax.jit
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


# ----------------------------------------------------------------------------
# The offline demonstration data: a family of shapes tasks.
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# experiments.transfer
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TransferConfig(TrainConfig):
  """TrainConfig's training flags, plus the transfer set-up."""
  scenario: str = option("all", "small_similar, small_different, large_similar, large_different, or all")
  pretrained_workdir: Optional[str] = option(None, "an experiments.cifar workdir whose best parameters are the "
                                             "pretrained model (default: pretrain on the shapes source task)")
  pretrained_weights: Optional[str] = option(None, "a torchvision-layout ResNet state dict as .safetensors "
                                             "(never pickle) for --model=resnet18/resnet34")
  cut_at: Optional[str] = option(None, "feature to cut the pretrained model at (default: a middle feature for "
                                 "small_different, pre_logits, i.e. drop the last layer, otherwise)")
  head_pool: str = option("flatten", "how the new head turns cut feature maps into a vector: flatten (keeps "
                          "positions; more weights) or avg (global average pooling, the notes' bottleneck head)")
  head_hidden: int = option(0, "width of a hidden Dense + ReLU layer in the new head (0: none; the Keras "
                            "bottleneck example uses 256); --dropout sets the head's dropout rate")
  normalize_inputs: str = option("target", "statistics that normalise the transferred model's inputs: "
                                 "target (the new training split's own) or pretrained (the ones the "
                                 "pretrained model was trained with, e.g. ImageNet mean/std for "
                                 "--pretrained_weights)")
  bottleneck: bool = option(False, "frozen-backbone scenarios: compute the backbone's features once, cache them "
                            "in WORKDIR, train only the head on them")
  fine_tune_from_pretrained: bool = option(False, "large_different: fine-tune from the pretrained weights "
                                           "instead of training from scratch")
  pretrain_epochs: int = option(30, "epochs of the pretraining run on the shapes source task")
  pretrain_augment: bool = option(True, "augment (translate, flip) the pretraining run's images")
  source_per_class: int = option(1000, "shapes source task: training images per class (5 classes)")
  small_per_class: int = option(50, "training images per class of the small target sets")
  large_per_class: int = option(500, "training images per class of the large target sets")
  test_per_class: int = option(200, "test images per class of every shapes task")


# Flag defaults of experiments.transfer that differ from TrainConfig's.
FLAG_DEFAULTS = {"dataset": "shapes", "batch_size": 32, "epochs": 15}


def validate(config: TransferConfig) -> None:
  """Raises ConfigError (one line) for a bad value or combination, before any compile."""
  validate_train_config(config)

  def check(ok, message):
    if not ok:
      raise ConfigError(message)

  check(config.scenario in SCENARIOS + ("all",),
        f"unknown scenario {config.scenario!r}; choose one of: {', '.join(SCENARIOS + ('all',))}")
  check(config.num_seeds == 1, "--num_seeds applies to experiments.cifar and sequence, not transfer")
  check(config.head_pool in ("avg", "flatten"),
        f"head_pool must be avg or flatten, got {config.head_pool!r}")
  check(config.head_hidden >= 0, f"head_hidden must be >= 0, got {config.head_hidden}")
  check(config.normalize_inputs in ("pretrained", "target"),
        f"normalize_inputs must be pretrained or target, got {config.normalize_inputs!r}")
  check(not (config.pretrained_workdir and config.pretrained_weights),
        "give --pretrained_workdir or --pretrained_weights, not both")
  check(not config.pretrained_workdir
        or os.path.exists(os.path.join(config.pretrained_workdir, "config.json")),
        f"--pretrained_workdir {config.pretrained_workdir} holds no experiments.cifar run (no config.json)")
  if config.pretrained_weights:
    check(config.pretrained_weights.endswith(".safetensors"),
          f"--pretrained_weights {config.pretrained_weights} is not a .safetensors file; jdl never "
          "loads pickle (.pt/.pth): save it with safetensors.torch.save_file(model.state_dict(), path)")
    check(os.path.isfile(config.pretrained_weights),
          f"--pretrained_weights {config.pretrained_weights} does not exist")
    check(config.model in ("resnet18", "resnet34"),
          f"--pretrained_weights holds a torchvision ResNet; use --model=resnet18 or resnet34, not {config.model!r}")
  check(not (config.dataset != "shapes" and not (config.pretrained_workdir or config.pretrained_weights)),
        f"--dataset={config.dataset} needs --pretrained_workdir or --pretrained_weights "
        "(only the built-in shapes family has a source task to pretrain on)")
  check(not (config.bottleneck and config.scenario in ("large_similar", "large_different")),
        f"--bottleneck needs a frozen backbone; scenario {config.scenario} fine-tunes it")
  check(not (config.bottleneck and config.augment),
        "--bottleneck computes features once, so --augment cannot change them; drop one of the two")
  check(not (config.fine_tune_from_pretrained and config.scenario not in ("large_different", "all")),
        "--fine_tune_from_pretrained applies to scenario large_different only")
  for name in ("source_per_class", "test_per_class", "pretrain_epochs"):
    check(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
  check(config.small_per_class >= 2, f"small_per_class must be >= 2, got {config.small_per_class}")
  check(config.large_per_class > config.small_per_class,
        f"large_per_class ({config.large_per_class}) must be larger than small_per_class "
        f"({config.small_per_class})")


def _train_config(config: TransferConfig, **changes) -> TrainConfig:
  base = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
  return TrainConfig(**{**base, **changes})


def _subsample(dataset: Dataset, per_class: int, name: str) -> Dataset:
  return dataclasses.replace(dataset, name=name,
                             train=_pick(*dataset.train, range(dataset.num_classes), per_class))


def target_tasks(config: TransferConfig) -> Dict[str, Dataset]:
  """{'similar_small', ...} datasets: the shapes family, or --dataset subsampled."""
  if config.dataset == "shapes":
    return shapes_tasks(config.seed, config.source_per_class, config.small_per_class,
                        config.large_per_class, config.test_per_class)
  data = load_dataset(config.dataset, data_dir=config.data_dir, num_test=config.num_test or None,
                      download=config.download)
  # One target dataset: whether it is "similar" is the user's call via --scenario.
  small = _subsample(data, config.small_per_class, f"{data.name}-small")
  large = _subsample(data, config.large_per_class, f"{data.name}-large")
  return {"similar_small": small, "different_small": small,
          "similar_large": large, "different_large": large}


def pretrained_model(config: TransferConfig, source: Optional[Dataset], workdir: str,
                     progress: bool, log) -> Pretrained:
  """The pretrained model: --pretrained_workdir, --pretrained_weights or a pretraining run."""
  dtype = jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32
  if config.pretrained_workdir:
    return load_workdir(config.pretrained_workdir, dtype)
  if config.pretrained_weights:
    return load_safetensors_resnet(config.pretrained_weights, config.model,
                                   (32, 32, 3), dtype)
  pre_config = _train_config(config, dataset="shapes-source", epochs=config.pretrain_epochs,
                             workdir=os.path.join(workdir, "pretrain"),
                             augment=config.pretrain_augment)
  log(f"Pretraining {config.model} on the shapes source task ({len(source.train[1])} images, "
      f"classes {', '.join(source.class_names)}) in {pre_config.workdir}")
  state, results = train.fit(pre_config, source, progress=progress, log=lambda line: None)
  log(f"  pretrained: test accuracy {results['test_accuracy']:.2%} on the source task")
  variables = {"params": state.params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  _, _, saved = _saved_config(pre_config.workdir)
  return Pretrained(train.build_classifier(pre_config, source.num_classes),
                    jax.device_get(variables), pre_config.workdir, results["test_accuracy"],
                    _recorded_stats(saved))


def _epoch_times(workdir: str) -> List[float]:
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [r["epoch_time_s"] for r in rows if "epoch_time_s" in r]


def run_scenario(config: TransferConfig, scenario: str, data: Dataset, pretrained: Pretrained,
                 workdir: str, progress: bool = True, log=print) -> dict:
  """One scenario on `data`; returns its row of the results table."""
  similar = scenario.endswith("similar")
  frozen_backbone = scenario.startswith("small")
  from_scratch = scenario == "large_different" and not config.fine_tune_from_pretrained
  run_config = _train_config(config, dataset=data.name, workdir=os.path.join(workdir, scenario))
  row = {"scenario": scenario, "data": data.name, "num_train": len(data.train[1])}
  if from_scratch:
    log(f"[{scenario}] new head, trained from scratch on {data.name}")
    _, results = train.fit(run_config, data, progress=progress, log=lambda line: None)
    row.update(cut_at=None, trainable_params=results["trainable_params"])
    return _finish_row(row, results)

  input_shape = data.input_shape
  backbone = pretrained.model
  # Only small_different keeps just the early layers; the others drop the last one.
  cut = config.cut_at or default_cut(backbone, input_shape, similar or not frozen_backbone)
  model = TransferModel(cut_model(backbone, cut, input_shape), data.num_classes,
                        train_backbone=not frozen_backbone, head_pool=config.head_pool,
                        head_dropout=config.dropout or 0.0, head_hidden=config.head_hidden,
                        dtype=backbone.dtype)
  variables = restore_matching(init_variables(model, input_shape, config.seed), pretrained.variables,
                               where=f"pretrained weights from {pretrained.source}")
  frozen = FROZEN_BACKBONE if frozen_backbone else ()
  what = ("frozen backbone cut at" if frozen_backbone else "fine-tuning everything, cut at")
  log(f"[{scenario}] {what} {cut!r} + new head ({data.num_classes} classes) on {data.name}")
  row["cut_at"] = cut
  input_stats = None  # train.fit's default: the new training split's own statistics
  if config.normalize_inputs == "pretrained":
    if pretrained.input_stats is None:
      log(f"  {pretrained.source} does not record its input statistics; normalising with the "
          "new training split's")
    input_stats = pretrained.input_stats
  row["normalize_inputs"] = "target" if input_stats is None else "pretrained"
  if frozen_backbone and config.bottleneck:
    return _bottleneck(run_config, row, model, variables, data, input_stats, progress, log)
  _, results = train.fit(run_config, data, model=model, variables=variables, frozen=frozen,
                         input_stats=input_stats, progress=progress, log=lambda line: None)
  row["trainable_params"] = results["trainable_params"]
  return _finish_row(row, results)


def _bottleneck(run_config: TrainConfig, row: dict, model: TransferModel, variables: dict,
                data: Dataset, input_stats, progress: bool, log) -> dict:
  """Scenarios 1-2 with cached features: the backbone runs once, the head trains.

  `input_stats` normalise the images as train.fit would (None: the training split's).
  """
  os.makedirs(run_config.workdir, exist_ok=True)
  if input_stats is None:
    train_split, _ = split_validation(data.train, run_config.validation_fraction, run_config.seed)
    input_stats = pipeline.channel_stats(train_split[0])  # as train.fit normalises images
  mean, std = input_stats
  cache = FeatureCache(os.path.join(run_config.workdir, "features.npz"))
  backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
  key = fingerprint(backbone_vars, mean, std, data.train, data.test,
                    np.frombuffer(model.backbone.cut_at.encode(), np.uint8))
  cached = cache.load(key)
  forward_s = None
  if cached is None:
    bottleneck_features(model, variables, data.train[0][:1], mean, std)  # compile outside the timing
    start = time.time()
    train_features = bottleneck_features(model, variables, data.train[0], mean, std)
    forward_s = time.time() - start
    test_features = bottleneck_features(model, variables, data.test[0], mean, std)
    cached = {"train": train_features, "test": test_features,
              "forward_s": np.array(forward_s)}
    cache.save(key, cached)
    log(f"  bottleneck features {train_features.shape[1:]} cached in {cache.path}")
  else:
    log(f"  bottleneck features read from {cache.path}")
  forward_s = float(cached["forward_s"])
  features = Dataset(f"{data.name}-features-{model.backbone.cut_at}",
                     (cached["train"], data.train[1]), (cached["test"], data.test[1]),
                     data.num_classes, data.class_names)
  head = Head(data.num_classes, pool=model.head_pool, dropout=model.head_dropout,
              hidden=model.head_hidden, dtype=model.dtype)
  feature_dim = features.input_shape[-1]
  _, results = train.fit(run_config, features, model=head,
                         input_stats=(np.zeros(feature_dim, np.float32), np.ones(feature_dim, np.float32)),
                         progress=progress, log=lambda line: None)
  epoch_times = _epoch_times(run_config.workdir)[1:]  # the first epoch includes compiling
  head_epoch_s = float(np.median(epoch_times)) if epoch_times else None
  row.update(trainable_params=results["trainable_params"], bottleneck=True,
             features_shape=list(features.input_shape), forward_pass_s=forward_s,
             head_epoch_s=head_epoch_s,
             bottleneck_speedup=(forward_s / head_epoch_s) if head_epoch_s else None)
  if head_epoch_s:
    log(f"  one forward pass over the training set {forward_s:.3f} s vs a head epoch on cached "
        f"features {head_epoch_s:.4f} s: {forward_s / head_epoch_s:.1f}x faster per epoch")
  return _finish_row(row, results)


def _finish_row(row: dict, results: dict) -> dict:
  row.update(epochs=results["epochs_run"], best_epoch=results["best_epoch"],
             time_s=results["train_time_s"], test_accuracy=results["test_accuracy"])
  return row


def scratch_baseline(config: TransferConfig, data: Dataset, workdir: str,
                     progress: bool = True) -> dict:
  """The same architecture trained from scratch on the same data."""
  run_config = _train_config(config, dataset=data.name,
                             workdir=os.path.join(workdir, f"scratch-{data.name}"))
  _, results = train.fit(run_config, data, progress=progress, log=lambda line: None)
  return {"epochs": results["epochs_run"], "time_s": results["train_time_s"],
          "test_accuracy": results["test_accuracy"],
          "trainable_params": results["trainable_params"]}


def format_table(rows: Sequence[dict]) -> str:
  """The console table of `run`'s results."""
  header = ("scenario", "train", "cut_at", "trainable", "epochs", "time s", "test acc",
            "scratch acc", "scratch s")
  lines = [[r["scenario"], str(r["num_train"]), str(r.get("cut_at") or "-"),
            f"{r['trainable_params']:,}", str(r["epochs"]), f"{r['time_s']:.1f}",
            f"{r['test_accuracy']:.2%}", f"{r['scratch']['test_accuracy']:.2%}",
            f"{r['scratch']['time_s']:.1f}"] for r in rows]
  widths = [max(len(c) for c in col) + 2 for col in zip(header, *lines)]
  fmt = lambda cells: "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([fmt(header)] + [fmt(cells) for cells in lines])


def run(config: TransferConfig, *, progress: bool = True, log=print) -> dict:
  """experiments.transfer: pretrain or load, then each scenario and its baseline.

  Everything lands in WORKDIR: pretrain/, one directory per scenario and per
  baseline (each resumable like any experiments.cifar run), results.json with
  the table.
  """
  start = time.time()
  validate(config)
  workdir = config.workdir or f"runs/transfer-{config.dataset}-{config.model}-seed{config.seed}"
  from jdl.config import make_writable_dir
  make_writable_dir(workdir)
  tasks = target_tasks(config)
  source = tasks.pop("source", None)
  pretrained = pretrained_model(config, source, workdir, progress, log)
  scenarios = SCENARIOS if config.scenario == "all" else (config.scenario,)
  rows, baselines = [], {}
  for scenario in scenarios:
    size, kind = scenario.split("_")
    data = tasks[f"{kind}_{size}"]
    row = run_scenario(config, scenario, data, pretrained, workdir, progress, log)
    if data.name not in baselines:
      if scenario == "large_different" and row.get("cut_at") is None:
        baselines[data.name] = {k: row[k] for k in ("epochs", "time_s", "test_accuracy",
                                                     "trainable_params")}  # it is the baseline
      else:
        baselines[data.name] = scratch_baseline(config, data, workdir, progress)
    row["scratch"] = baselines[data.name]
    log(f"  test accuracy {row['test_accuracy']:.2%} (from scratch {row['scratch']['test_accuracy']:.2%}), "
        f"{row['trainable_params']:,} trainable parameters, {row['time_s']:.1f} s")
    rows.append(row)
  table = format_table(rows)
  log("\n" + table)
  results = {"config": dataclasses.asdict(config), "pretrained": {
      "source": pretrained.source, "test_accuracy": pretrained.test_accuracy},
      "scenarios": rows, "wall_time_s": time.time() - start}
  write_json(os.path.join(workdir, "results.json"), results)
  log(f"results in {workdir}/results.json")
  return results
