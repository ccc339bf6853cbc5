"""Recurrences for the CPU: the `lstm` and `loops_per_device` kernels.

  lstm_layer          one LSTM layer over time with a hand-written VJP
                      (stands in for `jdl.models.rnn.lstm_scan`).
  split_over_devices  a recurrent layer's loop, one per device of the mesh's
                      data axis (stands in for `jdl.models.rnn.run_loop`).

`lstm_layer`, why:

XLA:CPU runs an elementwise fusion that reads one buffer at several offsets
(the four gate slices of h @ W_h) several times slower than one reading
separate buffers, and the autodiff of the plain scan is full of such fusions:
the LSTM cell's elementwise work, cheap in FLOPs, took a large share of the
forward (A/B in BUILD_NOTES.md 3.8). `lstm_layer` has a hand-written VJP
whose backward keeps each gate in its own buffer: one (B, 4H) @ (4H, H)
matmul per step, then every weight and bias gradient as one matmul after
the loop. Its forward is one (B, H) @ (H, 4H) matmul and one tanh over
(B, 4H) per step: fewer, larger ops than four per-gate matmuls and
activations, which made the training step a little faster.
"""
import jax
import jax.numpy as jnp

from jdl import parallel


def _lstm_scan(xs, b, w_h, valid):
  """The forward scan: (outputs (T, B, H), (h, c) final, residuals for the VJP).

  xs: (T, B, 4H) input projections of gates i, f, g, o; b: (4H,) both
  biases, added inside the loop, where the step's elementwise pass reads
  them for free (a separate pass over (T, B, 4H) would read and write all of
  it once more); w_h: (H, 4H); valid: None or (T, B, 1) of 1.0 (step
  counts) / 0.0 (keep the carry). Residuals, each (T, B, H): the carry's c after each step, the
  gate activations i, f, g, o, and (with valid) the carry's h after each
  step (without, that is the output).
  """
  _, batch, four_h = xs.shape
  hidden = four_h // 4
  zeros = jnp.zeros((batch, hidden), xs.dtype)
  # All four activations as one tanh over (B, 4H), sigmoid(a) = 0.5 tanh(a / 2)
  # + 0.5 on the i, f, o blocks: one elementwise pass instead of four.
  half, one, zero = (jnp.full((hidden,), v) for v in (0.5, 1.0, 0.0))
  scale = jnp.concatenate([half, half, one, half]).astype(xs.dtype)[None, :]  # (1, 4H)
  shift = jnp.concatenate([half, half, zero, half]).astype(xs.dtype)[None, :]
  bias = b.astype(xs.dtype)[None, :]  # (1, 4H)

  def body(carry, inputs):
    h, c = carry
    x_t, m = inputs
    gates = jnp.tanh((x_t + h @ w_h + bias) * scale) * scale + shift  # (B, 4H) activations
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    if m is None:
      return (h_new, c_new), (h_new, (c_new, i, f, g, o))
    out = m * h_new
    h_new, c_new = out + (1 - m) * h, m * c_new + (1 - m) * c
    return (h_new, c_new), (out, (c_new, i, f, g, o, h_new))

  carry, (ys, residuals) = jax.lax.scan(body, (zeros, zeros), (xs, valid))
  return ys, carry, residuals


def _lstm_forward(x, w_i, b, w_h, valid):
  """`lstm_layer`'s forward, with the residuals its VJP needs."""
  steps, batch, features = x.shape
  xs = x.reshape(steps * batch, features) @ w_i  # (T*B, 4H), all steps at once
  return _lstm_scan(xs.reshape(steps, batch, -1), b, w_h, valid)


@jax.custom_vjp
def lstm_layer(x, w_i, b, w_h, valid=None):
  """One LSTM layer over time from zero state: (outputs (T, B, H), (h, c) final).

  The cell of the module docstring, time-major, with a VJP written out by
  hand for speed on CPU.

  Arguments:
    x: (T, B, F) inputs.
    w_i: (F, 4H) input kernel; b: (4H,) both biases summed; w_h: (H, 4H)
      recurrent kernel; gates i, f, g, o along 4H.
    valid: None, or (T, B, 1) floats, 1.0 where step t of sequence b counts
      and 0.0 where the carry is kept and the output is zero.
  """
  ys, carry, _ = _lstm_forward(x, w_i, b, w_h, valid)
  return ys, carry


def _lstm_layer_fwd(x, w_i, b, w_h, valid=None):
  ys, carry, residuals = _lstm_forward(x, w_i, b, w_h, valid)
  return (ys, carry), (x, w_i, w_h, valid, ys, residuals)


def _lstm_layer_bwd(saved, cotangents):
  x, w_i, w_h, valid, ys, (c_seq, i, f, g, o, *h_seq) = saved  # each (T, B, H)
  d_ys, (d_h_last, d_c_last) = cotangents
  w_t = w_h.T  # (4H, H)
  previous = lambda seq: jnp.concatenate([jnp.zeros_like(seq[:1]), seq[:-1]])  # carry entering t
  c_prev = previous(c_seq)
  # tanh of the step's new c; past a length c_seq holds the kept carry instead,
  # but there every term using it is multiplied by m = 0.
  tanh_c = jnp.tanh(c_seq)

  def body(carry, inputs):
    d_h, d_c = carry  # gradients of the carry leaving this step
    d_y, c_p, i_t, f_t, g_t, o_t, tc, m = inputs
    if m is None:
      d_h_new, d_c_new = d_h + d_y, d_c
    else:  # the carry is m * new + (1 - m) * old, the output m * h_new
      d_h_new, d_c_new = m * (d_h + d_y), m * d_c
    d_c_total = d_c_new + d_h_new * o_t * (1 - tc * tc)
    d_gates = jnp.concatenate([  # gradients of the pre-activations, (B, 4H)
        d_c_total * g_t * i_t * (1 - i_t),
        d_c_total * c_p * f_t * (1 - f_t),
        d_c_total * i_t * (1 - g_t * g_t),
        d_h_new * tc * o_t * (1 - o_t)], axis=-1)
    d_h_old = d_gates @ w_t
    d_c_old = d_c_total * f_t
    if m is not None:
      d_h_old = d_h_old + (1 - m) * d_h
      d_c_old = d_c_old + (1 - m) * d_c
    return (d_h_old, d_c_old), d_gates

  _, d_xs = jax.lax.scan(body, (d_h_last, d_c_last),
                         (d_ys, c_prev, i, f, g, o, tanh_c, valid), reverse=True)
  steps, batch, features = x.shape
  hidden = w_h.shape[0]
  d_xs = d_xs.reshape(steps * batch, 4 * hidden)
  h_prev = previous(h_seq[0] if h_seq else ys)
  # Every weight and bias gradient in one (F + H + 1, T*B) @ (T*B, 4H) matmul:
  # two or three smaller ones ran side by side on XLA:CPU's two threads and
  # took longer than this one.
  rows = jnp.concatenate([x.reshape(steps * batch, features), h_prev.reshape(steps * batch, hidden),
                          jnp.ones((steps * batch, 1), x.dtype)], axis=-1)
  d_w = rows.T @ d_xs  # (F + H + 1, 4H)
  d_x = (d_xs @ w_i.T).reshape(steps, batch, features)
  d_valid = None if valid is None else jnp.zeros_like(valid)
  return (d_x, d_w[:features].astype(w_i.dtype), d_w[-1].astype(w_i.dtype),
          d_w[features:-1].astype(w_h.dtype), d_valid)


lstm_layer.defvjp(_lstm_layer_fwd, _lstm_layer_bwd)


def split_over_devices(recurrence, x, valid, weights):
  """recurrence(x, valid, *weights) -> (ys, carry), batch-split over the context mesh.

  Why: XLA:CPU runs a loop body on one core, so one device's loop uses one
  core; with the CPU split into one device per core (`--cpu_devices`) each
  device runs its slice of the batch through its own loop, and the MNIST-1D
  LSTM trains faster on 2 cores than on one (A/B in BUILD_NOTES.md 3.8).
  XLA's automatic partitioning of the same scan (the plain `run_loop`)
  computes the same values.

  x: (T, B, F) and valid (None or (T, B, ...)) are split along B over the
  'data' axis of the mesh set by `jax.set_mesh` (the training loop traces its
  step under it), the weights replicated; ys (T, B, H) and the carry ((B, H)
  or a tuple of them) come back split along B. Without such a mesh (or when B
  does not split evenly) it is a plain call.
  """
  devices = parallel.context_data_devices()
  if devices == 1 or x.shape[1] % devices:
    return recurrence(x, valid, *weights)
  time_major = jax.sharding.PartitionSpec(None, parallel.AXIS)  # (T, B, ...) split along B
  batch_major = jax.sharding.PartitionSpec(parallel.AXIS)  # (B, H) carries
  if valid is None:
    fn, args, specs = (lambda x, *w: recurrence(x, None, *w)), (x, *weights), (time_major,)
  else:
    fn, args, specs = recurrence, (x, valid, *weights), (time_major, time_major)
  replicated = (jax.sharding.PartitionSpec(),) * len(weights)
  # check_vma=False: the scans' zero initial carries are not marked as varying
  # over the axis; the gradients of the replicated weights are still summed
  # over devices (tested against the unsplit layer).
  return jax.shard_map(fn, in_specs=specs + replicated, out_specs=(time_major, batch_major),
                       check_vma=False)(*args)
