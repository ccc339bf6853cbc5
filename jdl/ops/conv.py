"""Convolutions for the CPU: the `conv_vmap_loop` and `conv_transpose` kernels.

`Conv` stands in for `nn.Conv`, `ConvTranspose` for `nn.ConvTranspose`: the
same fields (those jdl's models use), parameters, initialisation and outputs.
  Conv            XLA's convolution, but under vmap over stacked kernels
                  (`jdl.seeds`' replicas) a loop of convolutions instead of
                  the one grouped convolution JAX makes, which XLA:CPU runs
                  slowly.
  ConvTranspose   a stride-2 'SAME' transposed convolution as one matmul and
                  shifted adds (`conv_transpose_2x`) with its own VJP, whose
                  gradient XLA:CPU computes several times faster than that of
                  the input-dilated convolution behind `lax.conv_transpose`.
The A/B of each against plain Flax: BUILD_NOTES.md, "CPU kernels".
"""
import functools
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl.models.layers import Padding, Size, _padding, _pair


def _conv_nhwc(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _vmap_kernels_as_loop(fun):
  """`fun(x, kernel, ...)` (a convolution or one of its gradients) whose vmap
  over a batch of kernels runs it once per kernel, an unrolled loop; with the
  kernel shared it batches as usual (the mapped axis joins the batch).

  JAX batches a convolution over stacked kernels (`jdl.seeds`' replicas) as
  one grouped convolution, which XLA:CPU runs slower than the same
  convolutions one after the other, forward and both gradients (A/B in
  BUILD_NOTES.md 3.8).
  """
  batched = jax.custom_batching.custom_vmap(fun)

  @batched.def_vmap
  def rule(axis_size, in_batched, *args):
    if not in_batched[1]:
      return jax.vmap(fun, [0 if b else None for b in in_batched])(*args), True
    return jnp.stack([fun(*(a[i] if b else a for a, b in zip(args, in_batched)))
                      for i in range(axis_size)]), True
  return batched


@functools.lru_cache(maxsize=None)
def _cpu_conv(strides: Tuple[int, int], padding):
  """`_conv_nhwc` with these strides and padding for the CPU: the same values
  and gradients, and under vmap over kernels a loop instead of a grouped
  convolution (`_vmap_kernels_as_loop`) in the forward and both gradients."""
  def conv(x, kernel):
    return _conv_nhwc(x, kernel, strides, padding)

  def input_grad(x, kernel, dy):  # x only for its shape and dtype
    return jax.linear_transpose(lambda x: conv(x, kernel), x)(dy)[0]

  def kernel_grad(x, kernel, dy):  # kernel only for its shape and dtype
    return jax.linear_transpose(lambda k: conv(x, k), kernel)(dy)[0]

  conv_loop, input_grad_loop, kernel_grad_loop = map(_vmap_kernels_as_loop,
                                                     (conv, input_grad, kernel_grad))

  @jax.custom_vjp
  def cpu_conv(x, kernel):
    return conv_loop(x, kernel)

  def fwd(x, kernel):
    return conv_loop(x, kernel), (x, kernel)

  def bwd(saved, dy):
    x, kernel = saved
    return input_grad_loop(x, kernel, dy), kernel_grad_loop(x, kernel, dy)

  cpu_conv.defvjp(fwd, bwd)
  return cpu_conv


class Conv(nn.Module):
  """`nn.Conv` for the CPU: the same fields (those jdl's models use), parameters
  ('kernel' (kh, kw, Cin, features), 'bias'), initialisation and outputs,
  computed by XLA's convolution (`_cpu_conv`), which under vmap over stacked
  kernels runs a loop instead of a grouped convolution. No dilation or feature
  groups. `jdl.ops.choices` gives it to models on the CPU only.
  """
  features: int
  kernel_size: Size = 3
  strides: Size = 1
  padding: Padding = 'SAME'
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = _cpu_conv(_pair(self.strides), _padding(self.padding))(x, kernel)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)[None, None, None, :]
    return y


def _subpixel_taps(kernel_size: int):
  """For out = ConvTranspose(k, stride 2, 'SAME') (Flax/lax semantics, kernel not flipped):
  output row 2i + r (phase r in {0, 1}) reads input rows i + o with kernel tap
  a(r, o). Returns {(r, o): a}.

  lax pads the 2x-dilated input by pad_lo = ceil((k + s - 2) / 2) (k - 1 when
  s > k - 1) and correlates; dilated row m holds input row m / 2 when m is even,
  so tap a reaches input row i + (r + a - pad_lo) / 2 when r + a - pad_lo is even.
  """
  k, s = kernel_size, 2
  pad_lo = k - 1 if s > k - 1 else -(-(k + s - 2) // 2)
  return {(r, (r + a - pad_lo) // 2): a for r in (0, 1) for a in range(k) if (r + a - pad_lo) % 2 == 0}


def conv_transpose_2x(x, kernel):
  """`lax.conv_transpose(x, kernel, (2, 2), 'SAME')` (NHWC, HWIO) as one matmul and
  shifted adds: (B, H, W, Cin) -> (B, 2H, 2W, Cout).

  Output pixel (2i + r, 2j + c) (phase (r, c)) is the sum over input pixels
  (i + u, j + v) near (i, j) of x[i + u, j + v] @ kernel[a, b], with the tap
  (a, b) the phase and offset pick (`_subpixel_taps`; about k / 2 offsets per
  axis and phase). So one (B*H*W, Cin) @ (Cin, k*k*Cout) matmul gives every tap's
  contribution at every input pixel, and each phase adds up its taps
  shifted by their offsets (`_add_taps`); the phases are then interleaved. No
  zero taps are multiplied (k*k per input pixel, as the transposed convolution
  itself). The gradient is two matmuls and the same shifts in reverse, which
  XLA:CPU computes several times faster than the gradient of the
  input-dilated convolution behind `lax.conv_transpose`, or of a stride-1
  convolution with zero taps (A/B in BUILD_NOTES.md 3.8). Same values up to
  float rounding.
  """
  k = kernel.shape[0]
  cin, cout = kernel.shape[2:]
  batch, height, width, _ = x.shape
  per_tap = x.reshape(-1, cin) @ kernel.transpose(2, 0, 1, 3).reshape(cin, k * k * cout)
  return _add_taps(per_tap.reshape(batch, height, width, k, k, cout))


def _tap_offsets(kernel_size: int, phase: int):
  """[(offset, tap)] of one output phase along one axis (`_subpixel_taps`)."""
  return [(o, a) for (p, o), a in _subpixel_taps(kernel_size).items() if p == phase]


def _shift(x, u: int, v: int):
  """x (B, H, W, C) moved by (u, v) rows and columns, zeros shifted in:
  out[:, i, j] = x[:, i - u, j - v]."""
  _, height, width, _ = x.shape
  x = jnp.pad(x, ((0, 0), (max(u, 0), max(-u, 0)), (max(v, 0), max(-v, 0)), (0, 0)))
  return x[:, max(-u, 0):max(-u, 0) + height, max(-v, 0):max(-v, 0) + width]


@jax.custom_vjp
def _add_taps(per_tap):
  """(B, H, W, k, k, C) tap contributions -> (B, 2H, 2W, C): each output phase
  (r, c) sums its taps (a, b), each shifted by its offsets (-u, -v).

  The VJP is written out: the gradient of each tap is the phase's gradient
  shifted back, the k*k of them stacked. JAX's own transpose of these slices
  and adds is a sum of k*k zero-padded copies, one XLA:CPU fusion that reads
  the gradient at k*k offsets, which XLA:CPU runs slowly: it took longer
  than the rest of the layer's forward and backward together.
  """
  batch, height, width, k, _, channels = per_tap.shape
  phases = []
  for r in (0, 1):
    row = []
    for c in (0, 1):
      row.append(sum(_shift(per_tap[:, :, :, a, b, :], -u, -v)
                     for u, a in _tap_offsets(k, r) for v, b in _tap_offsets(k, c)))  # (B, H, W, C)
    phases.append(jnp.stack(row, 3))  # (B, H, W, c, C)
  return jnp.stack(phases, 2).reshape(batch, 2 * height, 2 * width, channels)  # (B, H, r, W, c, C)


def _add_taps_fwd(per_tap):
  return _add_taps(per_tap), per_tap.shape[3]


def _add_taps_bwd(k, d_out):
  batch, height2, width2, channels = d_out.shape
  d_phase = d_out.reshape(batch, height2 // 2, 2, width2 // 2, 2, channels)
  d_tap = {}
  for r in (0, 1):
    for c in (0, 1):
      for u, a in _tap_offsets(k, r):
        for v, b in _tap_offsets(k, c):
          d_tap[a, b] = _shift(d_phase[:, :, r, :, c, :], u, v)  # (B, H, W, C)
  stacked = jnp.stack([d_tap[a, b] for a in range(k) for b in range(k)], 3)  # (B, H, W, k*k, C)
  return (stacked.reshape(batch, height2 // 2, width2 // 2, k, k, channels),)


_add_taps.defvjp(_add_taps_fwd, _add_taps_bwd)


class ConvTranspose(nn.Module):
  """`nn.ConvTranspose` for the CPU: the same fields (those jdl's models use),
  parameters ('kernel' (k, k, Cin, features), 'bias'), initialisation and
  outputs; stride-2 'SAME' square kernels (the DCGAN decoder's) computed by
  `conv_transpose_2x`, whose gradient is several times faster on CPU, others
  by `lax.conv_transpose` as `nn.ConvTranspose` does.
  """
  features: int
  kernel_size: Sequence[int] = (4, 4)
  strides: Sequence[int] = (1, 1)
  padding: Padding = 'SAME'
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if kh == kw and _pair(self.strides) == (2, 2) and self.padding == 'SAME':
      y = conv_transpose_2x(x, kernel)
    else:
      y = jax.lax.conv_transpose(x, kernel, _pair(self.strides), _padding(self.padding),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)[None, None, None, :]
    return y


