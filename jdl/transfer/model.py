"""A pretrained network cut at a named feature, with a new classifier head."""
import dataclasses
import math
from typing import Any, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl.core import PRNG_IMPL, init_variables as fresh_variables
from jdl.errors import ConfigError
from jdl.models import layers

FROZEN_BACKBONE = ("^backbone/",)  # freeze patterns of a fully frozen backbone


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
  scratch and 'block3' beat it (BUILD_NOTES.md).
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
  key = jax.random.key(seed, impl=PRNG_IMPL)
  return jax.device_get(dict(fresh_variables(model, input_shape, key)))
