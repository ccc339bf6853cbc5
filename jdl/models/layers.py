"""Tiny parameter-free layers, as Modules so that each one is a row in the summary.

`nn.max_pool` and friends are plain functions; wrapping them costs nothing and
makes `jdl.summary.summarize` list them (with their output shapes) the way Keras
lists MaxPooling2D or Flatten. All layers take NHWC inputs.
"""
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from jdl.errors import ConfigError

# A side length or (height, width).
Size = Union[int, Tuple[int, int]]
# 'VALID', 'SAME', or explicit ((top, bottom), (left, right)) like torch's padding=1.
Padding = Union[str, Sequence[Tuple[int, int]]]


def _pair(size: Size) -> Tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _padding(padding: Padding):
  if isinstance(padding, str):
    return padding
  return tuple(tuple(p) for p in padding)


class MaxPool(nn.Module):
  """Max pooling over a spatial window (Keras MaxPooling2D, torch MaxPool2d).

  Explicit padding pads with -inf, as torch does, so padded cells never win.
  (On the CPU, `jdl.ops.pool.MaxPool` computes the same with a faster gradient.)

  Arguments:
    window: window side, or (height, width).
    strides: step; None means the window size (non-overlapping windows).
    padding: 'VALID', 'SAME' or ((top, bottom), (left, right)).
  """
  window: Size = 2
  strides: Optional[Size] = None
  padding: Padding = 'VALID'

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, H', W', C)
    window = _pair(self.window)
    strides = window if self.strides is None else _pair(self.strides)
    return nn.max_pool(x, window, strides, _padding(self.padding))


class AvgPool(nn.Module):
  """Average pooling over a spatial window (Keras AveragePooling2D).

  Padded cells count in the average, as with torch's default count_include_pad.

  Arguments:
    window: window side, or (height, width).
    strides: step; None means the window size.
    padding: 'VALID', 'SAME' or ((top, bottom), (left, right)).
  """
  window: Size = 2
  strides: Optional[Size] = None
  padding: Padding = 'VALID'

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, H', W', C)
    window = _pair(self.window)
    strides = window if self.strides is None else _pair(self.strides)
    return nn.avg_pool(x, window, strides, _padding(self.padding))


class Flatten(nn.Module):
  """Keeps the batch axis and flattens the rest: (B, ...) -> (B, prod(...))."""

  @nn.compact
  def __call__(self, x):
    return x.reshape(x.shape[0], -1)


class GlobalAvgPool(nn.Module):
  """Mean over the spatial axes: (B, H, W, C) -> (B, C).

  The sum runs in float32 even under bfloat16 compute (H*W terms lose bits in
  bf16); the result comes back in the input dtype.
  """

  @nn.compact
  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)


class GlobalMaxPool(nn.Module):
  """Max over the spatial axes: (B, H, W, C) -> (B, C)."""

  @nn.compact
  def __call__(self, x):
    return jnp.max(x, axis=(1, 2))


def check_cut(model: nn.Module, features: dict) -> None:
  """Raises when `model.cut_at` names no feature (call it just before the head).

  Models that support cutting return early right after the named feature; a
  model that reaches its head with `cut_at` set was asked for a layer it lacks.
  """
  if model.cut_at is not None:
    raise ConfigError(f"cut_at {model.cut_at!r} is not a feature of {type(model).__name__}; "
                      f"its features: {', '.join(dict.fromkeys([*features, 'pre_logits']))}")
