"""Max pooling as a reshape with a hand-written gradient (the `max_pool` kernel).

Why: XLA:CPU computes max pooling's gradient (select-and-scatter) slowly; for
non-overlapping windows a reshape + max, with each window's gradient sent to
its first maximum in a few elementwise passes, is the same function and its
exact gradient, ties included (tested), and far faster (A/B in BUILD_NOTES.md 3.8).
"""
import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl.models.layers import MaxPool as PlainMaxPool, _pair


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_tiled(x, window: Tuple[int, int]):
  """Non-overlapping max pooling as a reshape and a max: (B, H, W, C) -> (B, H/h, W/w, C).

  Same outputs as `nn.max_pool(x, window, window, 'VALID')` (trailing rows and
  columns that fill no window are dropped, as VALID does), and the same
  gradient: each window's gradient goes to its first maximum in row-major
  order, as torch and XLA's select-and-scatter do. That gradient is a few
  elementwise passes (`_max_pool_tiled_bwd`), which XLA:CPU computes far faster
  than select-and-scatter, and faster than autodiff's gradient of the same
  reshape and max (BUILD_NOTES.md 3.8).
  """
  (h, w), (batch, height, width, channels) = window, x.shape
  x = x[:, :height // h * h, :width // w * w]
  return x.reshape(batch, height // h, h, width // w, w, channels).max(axis=(2, 4))


def _max_pool_tiled_fwd(x, window):
  y = max_pool_tiled(x, window)
  return y, (x, y)


def _max_pool_tiled_bwd(window, residuals, g):
  x, y = residuals  # (B, H, W, C), (B, Ho, Wo, C)
  (h, w), (batch, height, width, channels) = window, x.shape
  out_h, out_w = height // h, width // w
  x = x[:, :out_h * h, :out_w * w].reshape(batch, out_h, h, out_w, w, channels)
  taken = jnp.zeros(y.shape, bool)  # (B, Ho, Wo, C): this window's maximum already found
  rows = []
  for i in range(h):
    row = []
    for j in range(w):
      first = (x[:, :, i, :, j, :] == y) & ~taken
      taken = taken | first
      row.append(jnp.where(first, g, jnp.zeros_like(g)))  # (B, Ho, Wo, C)
    rows.append(jnp.stack(row, axis=3))  # (B, Ho, Wo, w, C)
  dx = jnp.stack(rows, axis=2).reshape(batch, out_h * h, out_w * w, channels)  # via (B, Ho, h, Wo, w, C)
  return (jnp.pad(dx, ((0, 0), (0, height - out_h * h), (0, width - out_w * w), (0, 0))),)


max_pool_tiled.defvjp(_max_pool_tiled_fwd, _max_pool_tiled_bwd)


class MaxPool(PlainMaxPool):
  """`jdl.models.layers.MaxPool` (same fields, outputs and gradients) with
  non-overlapping VALID windows, the common case, computed by `max_pool_tiled`."""

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, H', W', C)
    window = _pair(self.window)
    strides = window if self.strides is None else _pair(self.strides)
    if strides == window and self.padding == 'VALID':
      return max_pool_tiled(x, window)
    return super().__call__(x)
