"""Recurrent layers (Elman RNN, LSTM, GRU) over `jax.lax.scan`, in PyTorch's layout.

Each layer and direction owns four parameters; G is the number of gate blocks
(1 for 'rnn', 4 for 'lstm', 3 for 'gru'), H the hidden size, F the layer's input
width (F for layer 0, D*H above it, D = 2 if bidirectional else 1):

    input_kernel      (F, G*H)   = PyTorch weight_ih_l{k}.T
    recurrent_kernel  (H, G*H)   = PyTorch weight_hh_l{k}.T
    input_bias        (G*H,)     = PyTorch bias_ih_l{k}
    recurrent_bias    (G*H,)     = PyTorch bias_hh_l{k}

The blocks along G*H follow PyTorch's order, so a state dict converts by
transposing only (`jdl.pretrained.convert_torch_state_dict`). The submodule of
layer l is 'layer{l}', its backward direction 'layer{l}_reverse' (PyTorch's
'_reverse').
With W_i = input_kernel, W_h = recurrent_kernel, b_i, b_h the biases and the
per-gate slices named by suffix:

    rnn:   h' = act(x W_i + b_i + h W_h + b_h)                 (act = tanh default)
    lstm:  i, f, g, o = split(x W_i + b_i + h W_h + b_h, 4)
           c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
           h' = sigmoid(o) * tanh(c')
    gru:   r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
           z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
           n = tanh(x W_in + b_in + r * (h W_hn + b_hn))      (PyTorch's GRU: r
           h' = (1 - z) * n + z * h                             gates h W_hn + b_hn)

Speed: x W_i + b_i for all time steps is one (B*T, F) @ (F, G*H) matmul before
the scan; each scan step only computes h W_h. Compute runs in `dtype` (the
carry too), parameters stay float32. Two fields take the CPU's faster
stand-ins (`jdl.ops.choices` gives them on the CPU): `lstm_loop` (an LSTM
layer with a hand-written gradient) and `loop_runner` (one loop per device).

Init (Keras' defaults): input_kernel glorot-uniform, recurrent_kernel orthogonal
(the whole (H, G*H) matrix), biases zero, except the LSTM forget-gate slice of
input_bias, which is 1.0 (Keras' unit_forget_bias) so that the cell keeps its
state early in training. PyTorch instead draws everything from U(-1/sqrt(H), 1/sqrt(H)).

Data parallel: the loops trace their steps inside `jax.set_mesh(mesh)` with a
'data' axis (see jdl.parallel). With `loop_runner=run_loop` XLA partitions
each layer's scan itself; with `jdl.ops.recurrence.split_over_devices` the
recurrence is a `shard_map` over that axis: every device runs the scan of its
1/n of the batch, and the weight gradients are summed across devices. XLA:CPU
runs a loop body on one thread, so n CPU devices (`--cpu_devices`, by default
one per core for recurrent models) are how an LSTM uses n cores.

Implementation: 'scan' (default, any backend) or, for LSTMs on a CUDA GPU,
'cudnn': each layer and direction is one `jax.experimental.rnn.lstm` call (the
cuDNN kernel, float32 only), with the same parameters packed into cuDNN's flat
layout by `pack_cudnn_lstm`. Its gates and biases are PyTorch's, so the two
implementations compute the same function (tested against
`jax.experimental.rnn.lstm_ref` on CPU, and against the kernel on a GPU).

Variable lengths: with `lengths` (B,) given, steps t >= lengths[b] leave the carry
unchanged (the final state is the state after the last valid step) and output
zeros. The backward direction reverses each sequence within its own length, so
it starts at that sequence's last valid step, as PyTorch's packed sequences do.
"""
from typing import Any, Callable, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl import activations
from jdl.errors import ConfigError

# Gate blocks per cell, in PyTorch's order along the G*H axis.
GATES = {'rnn': 1, 'lstm': 4, 'gru': 3}
IMPLEMENTATIONS = ('scan', 'cudnn')


def _check_cell(cell: str):
  if cell not in GATES:
    raise ConfigError(f"unknown rnn cell {cell!r}; choose one of: {', '.join(GATES)}")


def check_implementation(implementation: str, cell: str, dtype: Any = jnp.float32,
                         backend: bool = False):
  """ConfigError unless `implementation` can run `cell` in `dtype` (and, with
  backend=True, on this JAX backend: what entrypoints check before loading).

  'cudnn' is an LSTM-only, float32-only kernel (jax.experimental.rnn).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f"unknown rnn implementation {implementation!r}; choose one of: "
                      f"{', '.join(IMPLEMENTATIONS)}")
  if implementation == 'cudnn':
    if cell != 'lstm':
      raise ConfigError(f"rnn implementation 'cudnn' runs only the lstm cell, not {cell!r}; "
                        "use implementation 'scan'")
    if jnp.dtype(dtype) != jnp.float32:
      raise ConfigError(f"rnn implementation 'cudnn' computes in float32 only, not "
                        f"{jnp.dtype(dtype).name}; use implementation 'scan' or float32")
    if backend:
      check_cudnn_backend()


def check_cudnn_backend(backend: Optional[str] = None):
  """ConfigError unless the backend can run the cuDNN LSTM (a CUDA GPU)."""
  backend = backend or jax.default_backend()
  if backend not in ('gpu', 'cuda'):
    raise ConfigError(f"rnn implementation 'cudnn' needs a CUDA GPU, but the JAX backend is "
                      f"{backend!r}; use implementation 'scan'")


def pack_cudnn_lstm(input_kernel, recurrent_kernel, input_bias, recurrent_bias):
  """One LSTM layer and direction's parameters as cuDNN's flat weight vector.

  Layout (jax.experimental.rnn, one pseudo-layer): W_ih (4H, F), W_hh (4H, H),
  b_ih (4H,), b_hh (4H,), each flattened row-major, gates i, f, g, o as here.

  Arguments:
    input_kernel: (F, 4H), recurrent_kernel: (H, 4H), input_bias and
      recurrent_bias: (4H,); `RecurrentLayer`'s parameters.

  Returns:
    (4H * (F + H + 2),) float32.
  """
  return jnp.concatenate([input_kernel.T.reshape(-1), recurrent_kernel.T.reshape(-1),
                          input_bias, recurrent_bias]).astype(jnp.float32)


def _cudnn_lstm(x, weights, lengths, hidden_size: int):
  """Runs one cuDNN LSTM layer from zero state: (outputs (B, T, H), (h, c)).

  x: (B, T, F) float32; weights from `pack_cudnn_lstm`; lengths: (B,) int32.
  """
  from jax.experimental import rnn as cudnn_rnn  # Imported here: GPU-only, experimental.
  check_cudnn_backend()
  batch, _, features = x.shape
  zeros = jnp.zeros((1, batch, hidden_size), jnp.float32)  # (layers * directions, B, H)
  ys, h, c = cudnn_rnn.lstm(x, zeros, zeros, weights, lengths, input_size=features,
                            hidden_size=hidden_size, num_layers=1, dropout=0.0,
                            bidirectional=False)
  return ys, (h[0], c[0])


def _lstm_bias_init(hidden_size: int):
  """Zeros with the forget-gate block (i, [f], g, o) set to 1.0."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[hidden_size:2 * hidden_size].set(1.0)
  return init


# ------------------------------------------------------------------ cell steps
# The rnn and gru steps take the carry h, the step's input projection
# xp = x W_i + b_i (B, G*H), W_h (H, G*H) and b_h (1, G*H), and return the new
# h; their gradients are JAX's autodiff of the scan. The LSTM's recurrence is
# a field of the layer (`lstm_loop`: `lstm_scan`, or on the CPU
# `jdl.ops.recurrence.lstm_layer` with a hand-written VJP).


def _rnn_step(act: Callable, h, xp, w_h, b_h):
  return act(xp + h @ w_h + b_h)


def _gru_step(h, xp, w_h, b_h):
  x_r, x_z, x_n = jnp.split(xp, 3, axis=-1)  # each (B, H)
  h_r, h_z, h_n = jnp.split(h @ w_h + b_h, 3, axis=-1)
  r = jax.nn.sigmoid(x_r + h_r)
  z = jax.nn.sigmoid(x_z + h_z)
  n = jnp.tanh(x_n + r * h_n)
  return (1 - z) * n + z * h


def run_loop(recurrence, x, valid, weights):
  """Runs a layer's recurrence(x, valid, *weights) -> (ys, carry) as it is; under a
  data-parallel mesh XLA partitions it. (`jdl.ops.recurrence.split_over_devices`
  is the CPU's faster stand-in: one loop per device.)"""
  return recurrence(x, valid, *weights)


def lstm_scan(x, w_i, b, w_h, valid=None):
  """One LSTM layer over time from zero state: (outputs (T, B, H), (h, c) final).

  The plain scan, differentiated by JAX (`jdl.ops.recurrence.lstm_layer` is
  the CPU's faster stand-in, with a hand-written VJP).

  Arguments:
    x: (T, B, F) inputs.
    w_i: (F, 4H) input kernel; b: (4H,) both biases summed; w_h: (H, 4H)
      recurrent kernel; gates i, f, g, o along 4H.
    valid: None, or (T, B, 1) floats, 1.0 where step t of sequence b counts
      and 0.0 where the carry is kept and the output is zero.
  """
  steps, batch, _ = x.shape
  hidden = w_h.shape[0]
  xs = x @ w_i + b[None, None, :]  # (T, B, 4H), all steps at once

  def body(carry, inputs):
    h, c = carry
    xp_t, m = inputs
    i, f, g, o = jnp.split(xp_t + h @ w_h, 4, axis=-1)  # each (B, H)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    if m is None:
      return (h_new, c_new), h_new
    return (m * h_new + (1 - m) * h, m * c_new + (1 - m) * c), m * h_new

  zeros = jnp.zeros((batch, hidden), x.dtype)
  carry, ys = jax.lax.scan(body, (zeros, zeros), (xs, valid))
  return ys, carry


def _reverse_within(x, lengths):
  """Reverses each sequence of x (B, T, ...) within its first lengths[b] steps.

  Steps past the length stay in place, so applying it twice is the identity.
  """
  t = jnp.arange(x.shape[1])[None, :]  # (1, T)
  n = lengths[:, None]  # (B, 1)
  index = jnp.where(t < n, n - 1 - t, t)  # (B, T)
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _reverse(x, lengths):
  """x (B, T, ...) in reverse time order, within each length if lengths is given."""
  return jnp.flip(x, 1) if lengths is None else _reverse_within(x, lengths)


class RecurrentLayer(nn.Module):
  """One layer, one direction: (B, T, F) -> outputs (B, T, H), final state.

  Arguments:
    cell: 'rnn', 'lstm' or 'gru'.
    hidden_size: H.
    activation: activation name of the 'rnn' cell (ignored by lstm and gru).
    reverse: run from each sequence's last valid step to its first.
    dtype: compute dtype; parameters stay float32.
    implementation: 'scan', or 'cudnn' (lstm, float32, CUDA GPU only).
    lstm_loop: the LSTM recurrence, `lstm_scan` or a stand-in with its signature.
    loop_runner: how the recurrence runs, `run_loop` or a stand-in with its
      signature (`jdl.ops` chooses the CPU's).
  """
  cell: str = 'lstm'
  hidden_size: int = 128
  activation: str = 'tanh'
  reverse: bool = False
  dtype: Any = jnp.float32
  implementation: str = 'scan'
  lstm_loop: Callable = lstm_scan
  loop_runner: Callable = run_loop

  @nn.compact
  def __call__(self, x, lengths=None):
    """Returns (outputs (B, T, H), final state: h (B, H), or (h, c) for lstm).

    Arguments:
      x: (B, T, F) inputs.
      lengths: optional (B,) ints; steps t >= lengths[b] keep the carry and
        output zeros.
    """
    _check_cell(self.cell)
    check_implementation(self.implementation, self.cell, self.dtype)
    gh = GATES[self.cell] * self.hidden_size
    bias_init = (_lstm_bias_init(self.hidden_size) if self.cell == 'lstm'
                 else nn.initializers.zeros)
    w_i = self.param('input_kernel', nn.initializers.glorot_uniform(), (x.shape[-1], gh))
    w_h = self.param('recurrent_kernel', nn.initializers.orthogonal(), (self.hidden_size, gh))
    b_i = self.param('input_bias', bias_init, (gh,))
    b_h = self.param('recurrent_bias', nn.initializers.zeros, (gh,))
    w_i, w_h, b_i, b_h = (p.astype(self.dtype) for p in (w_i, w_h, b_i, b_h))

    steps = x.shape[1]
    if self.implementation == 'cudnn':
      return self._cudnn(x, lengths, pack_cudnn_lstm(w_i, w_h, b_i, b_h))
    # Reverse and transpose the (B, T, F) inputs, not the G*H-wide projections:
    # F is small, and the projections' gradient then needs no transpose either.
    x = x.astype(self.dtype)
    if self.reverse:
      x = _reverse(x, lengths)
    x = jnp.swapaxes(x, 0, 1)  # (T, B, F): scan runs over the leading axis
    # After reversing within the length, the valid steps are still the first ones.
    valid = None if lengths is None else jnp.arange(steps)[:, None] < lengths[None, :]  # (T, B)
    if self.cell == 'lstm':
      if valid is not None:
        valid = valid[..., None].astype(self.dtype)  # (T, B, 1)

      def recurrence(x, valid, w_i, w_h, b_i, b_h):
        return self.lstm_loop(x, w_i, b_i + b_h, w_h, valid)  # biases summed once
    else:
      step = (_gru_step if self.cell == 'gru'
              else lambda h, *a: _rnn_step(activations.get(self.activation), h, *a))

      def recurrence(x, valid, w_i, w_h, b_i, b_h):
        xs = x @ w_i + b_i[None, None, :]  # (T, B, G*H), all steps at once
        b_h = b_h[None, :]  # (1, G*H), added to h @ W_h (B, G*H) each step
        carry = jnp.zeros((x.shape[1], self.hidden_size), self.dtype)
        if valid is None:
          def body(carry, xp_t):
            carry = step(carry, xp_t, w_h, b_h)
            return carry, carry
          carry, ys = jax.lax.scan(body, carry, xs)
          return ys, carry

        def body(carry, inputs):
          xp_t, valid_t = inputs
          new = step(carry, xp_t, w_h, b_h)
          keep = valid_t[:, None]  # (B, 1)
          return jnp.where(keep, new, carry), jnp.where(keep, new, jnp.zeros_like(new))
        carry, ys = jax.lax.scan(body, carry, (xs, valid))
        return ys, carry
    ys, carry = self.loop_runner(recurrence, x, valid, (w_i, w_h, b_i, b_h))

    ys = jnp.swapaxes(ys, 0, 1)  # (B, T, H)
    if self.reverse:
      ys = _reverse(ys, lengths)
    return ys, carry

  def _cudnn(self, x, lengths, weights):
    """The same layer through the cuDNN kernel; the scan path's semantics."""
    batch, steps, _ = x.shape
    x = x.astype(jnp.float32)
    if lengths is not None:
      lengths = lengths.astype(jnp.int32)
    if self.reverse:
      x = _reverse(x, lengths)
    # cuDNN wants lengths >= 1; an empty sequence keeps the zero state instead.
    kernel_lengths = (jnp.full((batch,), steps, jnp.int32) if lengths is None
                      else jnp.maximum(lengths, 1))
    ys, carry = _cudnn_lstm(x, weights, kernel_lengths, self.hidden_size)
    if lengths is not None:  # Zeros past each length, whatever the kernel leaves there.
      ys = jnp.where(jnp.arange(steps)[None, :, None] < lengths[:, None, None], ys, 0.0)
      empty = (lengths == 0)[:, None]  # (B, 1)
      carry = tuple(jnp.where(empty, 0.0, s) for s in carry)
    if self.reverse:
      ys = _reverse(ys, lengths)
    return ys, carry


class RNN(nn.Module):
  """Stacked, optionally bidirectional recurrent layers, like torch.nn.LSTM/GRU/RNN.

  Arguments:
    cell: 'rnn' (Elman), 'lstm' or 'gru'.
    hidden_size: H, per direction.
    num_layers: stacked layers; layer l > 0 reads the (B, T, D*H) outputs below.
    bidirectional: add a backward direction per layer (D = 2).
    dropout: rate on each layer's outputs except the last one's (as PyTorch),
      only with train=True (needs the 'dropout' rng).
    activation: activation name of the 'rnn' cell.
    return_sequences: return all outputs (B, T, D*H), else the last state (B, D*H).
    dtype: compute dtype; parameters stay float32.
    implementation: 'scan', or 'cudnn' (lstm, float32, CUDA GPU only): see
      the module docstring.
    lstm_loop, loop_runner: as in `RecurrentLayer`.
  """
  cell: str = 'lstm'
  hidden_size: int = 128
  num_layers: int = 1
  bidirectional: bool = False
  dropout: float = 0.0
  activation: str = 'tanh'
  return_sequences: bool = True
  dtype: Any = jnp.float32
  implementation: str = 'scan'
  lstm_loop: Callable = lstm_scan
  loop_runner: Callable = run_loop

  def __post_init__(self):
    _check_cell(self.cell)
    check_implementation(self.implementation, self.cell, self.dtype)
    if self.num_layers < 1:
      raise ConfigError(f'rnn num_layers must be >= 1, got {self.num_layers}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, lengths=None, *, train: bool = False):
    """Returns (outputs, final_states).

    outputs: (B, T, D*H) with zeros past each length, or with
    return_sequences=False the last state (B, D*H): the forward direction's final
    h, then (bidirectional) the backward direction's h after the first step.
    final_states: one entry per layer and direction, ordered layer0, layer0
    reverse, layer1, ...; each h (B, H), or (h, c) for lstm.

    Arguments:
      x: (B, T, F) sequences.
      lengths: optional (B,) ints, the valid steps of each sequence.
      train: enables dropout between layers.
    """
    directions = (False, True) if self.bidirectional else (False,)
    if lengths is not None:
      lengths = jnp.asarray(lengths, jnp.int32)  # (B,)
    final_states = []
    for layer in range(self.num_layers):
      if layer > 0:
        x = nn.Dropout(self.dropout, deterministic=not train, name=f'dropout{layer - 1}')(x)
      outputs = []
      for reverse in directions:
        y, state = RecurrentLayer(
            cell=self.cell, hidden_size=self.hidden_size, activation=self.activation,
            reverse=reverse, dtype=self.dtype, implementation=self.implementation,
            lstm_loop=self.lstm_loop, loop_runner=self.loop_runner,
            name=f'layer{layer}' + ('_reverse' if reverse else ''))(x, lengths)
        outputs.append(y)
        final_states.append(state)
      x = jnp.concatenate(outputs, axis=-1)  # (B, T, D*H)
    if self.return_sequences:
      return x, final_states
    return last_state(final_states, self.cell, self.bidirectional), final_states


def last_state(final_states: List[Any], cell: str, bidirectional: bool):
  """The top layer's final h, both directions concatenated: (B, D*H).

  Arguments:
    final_states: `RNN`'s second output.
    cell: the RNN's cell ('lstm' states are (h, c)).
    bidirectional: whether the RNN has two directions.
  """
  top = final_states[-2:] if bidirectional else final_states[-1:]
  hs = [s[0] if cell == 'lstm' else s for s in top]
  return jnp.concatenate(hs, axis=-1)


class RNNClassifier(nn.Module):
  """`RNN` -> last state -> Dense head: a sequence classifier.

  Arguments:
    cell, hidden_size, num_layers, bidirectional, dropout, activation, dtype,
      implementation, lstm_loop, loop_runner: as in `RNN`.
    num_classes: number of logits.
  """
  cell: str = 'lstm'
  hidden_size: int = 128
  num_layers: int = 1
  bidirectional: bool = False
  dropout: float = 0.0
  activation: str = 'tanh'
  num_classes: int = 10
  dtype: Any = jnp.float32
  implementation: str = 'scan'
  lstm_loop: Callable = lstm_scan
  loop_runner: Callable = run_loop

  @nn.compact
  def __call__(self, x, lengths=None, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    features: 'pre_logits' the last state (B, D*H), 'sequence' the top layer's
    outputs (B, T, D*H).

    Arguments:
      x: (B, T, F) sequences, (B, T) taken as F = 1, or (B, H, W, C) images read
        row by row as T = H steps of F = W*C pixels (sequential MNIST by rows).
      lengths: optional (B,) ints, the valid steps of each sequence.
      train: enables dropout between layers.
    """
    if x.ndim == 2:
      x = x[..., None]  # (B, T, 1)
    if x.ndim == 4:
      x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, H, W*C): one step per image row
    outputs, states = RNN(
        cell=self.cell, hidden_size=self.hidden_size, num_layers=self.num_layers,
        bidirectional=self.bidirectional, dropout=self.dropout, activation=self.activation,
        return_sequences=True, dtype=self.dtype, implementation=self.implementation,
        lstm_loop=self.lstm_loop, loop_runner=self.loop_runner, name='rnn')(x, lengths, train=train)
    last = last_state(states, self.cell, self.bidirectional)  # (B, D*H)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(last)
    return logits.astype(jnp.float32), {'pre_logits': last, 'sequence': outputs}


class LanguageModel(nn.Module):
  """Embedding -> stacked `RNN` -> Dense over the vocabulary at every step.

  A character (or token) language model: logits at step t predict token t + 1.

  Arguments:
    vocab_size: number of token ids.
    embed_dim: embedding width.
    cell, hidden_size, num_layers, dropout, dtype, implementation, lstm_loop,
      loop_runner: as in `RNN` (unidirectional: a language model must not read
      ahead). Dropout also applies to the top layer's outputs, before the head.
  """
  vocab_size: int
  embed_dim: int = 64
  cell: str = 'lstm'
  hidden_size: int = 256
  num_layers: int = 2
  dropout: float = 0.0
  dtype: Any = jnp.float32
  implementation: str = 'scan'
  lstm_loop: Callable = lstm_scan
  loop_runner: Callable = run_loop

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    """Returns (logits (B, T, vocab_size) float32, {'sequence': (B, T, H)}).

    Arguments:
      tokens: (B, T) int token ids.
      train: enables dropout.
    """
    x = nn.Embed(self.vocab_size, self.embed_dim, name='embed')(tokens).astype(self.dtype)
    outputs, _ = RNN(cell=self.cell, hidden_size=self.hidden_size, num_layers=self.num_layers,
                     dropout=self.dropout, dtype=self.dtype, implementation=self.implementation,
                     lstm_loop=self.lstm_loop, loop_runner=self.loop_runner,
                     name='rnn')(x, train=train)
    outputs = nn.Dropout(self.dropout, deterministic=not train, name='dropout')(outputs)
    logits = nn.Dense(self.vocab_size, dtype=self.dtype, name='head')(outputs)
    return logits.astype(jnp.float32), {'sequence': outputs}
