"""Recurrent layers against a float64 NumPy reference of the PyTorch equations.

The reference below is written out per time step and per gate from PyTorch's
documentation of nn.RNN, nn.LSTM and nn.GRU, on weights in PyTorch's layout
(weight_ih (G*H, F), weight_hh (G*H, H), two biases). jdl's parameters are
passed to it transposed, so a wrong gate order, bias or layout fails. Sizes are
tiny (B <= 3, T = 5, F = 3, H = 4) and every model's apply is jitted once, so the
file runs in seconds on a 2-core CPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl.errors import ConfigError
from jdl.models.rnn import RNN, RNNClassifier
from jdl.pretrained import convert_torch_state_dict
from jdl.summary import count_params, summarize

B, T, F, H = 2, 5, 3, 4
CELLS = ('rnn', 'lstm', 'gru')
GATES = {'rnn': 1, 'lstm': 4, 'gru': 3}  # written here again, not read from jdl


# ------------------------------------------------------------ NumPy reference


def sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


def ref_step(cell, x, h, c, w, act=np.tanh):
  """One step of one sequence: x (F,), h, c (H,); w in PyTorch layout. -> (h, c)."""
  w_ih, w_hh, b_ih, b_hh = w['weight_ih'], w['weight_hh'], w['bias_ih'], w['bias_hh']
  n = h.shape[0]
  block = lambda a, k: a[k * n:(k + 1) * n]  # gate k's rows
  x_part = lambda k: block(w_ih, k) @ x + block(b_ih, k)  # W_i* x + b_i*
  h_part = lambda k: block(w_hh, k) @ h + block(b_hh, k)  # W_h* h + b_h*
  if cell == 'rnn':
    return act(x_part(0) + h_part(0)), None
  if cell == 'lstm':  # gate order i, f, g, o
    i = sigmoid(x_part(0) + h_part(0))
    f = sigmoid(x_part(1) + h_part(1))
    g = np.tanh(x_part(2) + h_part(2))
    o = sigmoid(x_part(3) + h_part(3))
    c = f * c + i * g
    return o * np.tanh(c), c
  # gru, gate order r, z, n
  r = sigmoid(x_part(0) + h_part(0))
  z = sigmoid(x_part(1) + h_part(1))
  new = np.tanh(x_part(2) + r * h_part(2))
  return (1 - z) * new + z * h, None


def ref_direction(cell, xs, w, act):
  """xs (T, F) -> outputs (T, H), final state (h or (h, c))."""
  n = w['weight_hh'].shape[1]
  h, c = np.zeros(n), np.zeros(n)
  outputs = []
  for x in xs:
    h, c = ref_step(cell, x, h, c, w, act)
    outputs.append(h)
  outputs = np.array(outputs).reshape(len(xs), n)
  return outputs, ((h, c) if cell == 'lstm' else h)


def ref_sequence(cell, xs, torch_weights, num_layers, bidirectional, act=np.tanh):
  """One unpadded sequence xs (T, F) through the stacked, bidirectional RNN.

  torch_weights: {'weight_ih_l0': ..., 'weight_ih_l0_reverse': ...} (float64).
  Returns outputs (T, D*H) and final states [layer0, layer0_reverse, layer1, ...].
  """
  states = []
  for layer in range(num_layers):
    outputs = []
    for suffix in (('', '_reverse') if bidirectional else ('',)):
      w = {name: torch_weights[f'{name}_l{layer}{suffix}']
           for name in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')}
      if suffix:  # run on the reversed sequence, then put the outputs back in order
        out, state = ref_direction(cell, xs[::-1], w, act)
        out = out[::-1]
      else:
        out, state = ref_direction(cell, xs, w, act)
      outputs.append(out)
      states.append(state)
    xs = np.concatenate(outputs, axis=-1)
  return xs, states


def ref_batch(cell, x, torch_weights, num_layers, bidirectional, lengths=None, act=np.tanh):
  """x (B, T, F): each sequence cut to its length, run alone, outputs zero-padded."""
  x = np.asarray(x, np.float64)
  lengths = [x.shape[1]] * x.shape[0] if lengths is None else lengths
  outs, states = [], []
  for b, n in enumerate(lengths):
    out, st = ref_sequence(cell, x[b, :n], torch_weights, num_layers, bidirectional, act)
    padded = np.zeros((x.shape[1], out.shape[1] if n else _width(torch_weights, bidirectional)))
    padded[:n] = out
    outs.append(padded)
    states.append(st)
  per_entry = list(zip(*states))  # entry k: one state per example
  stack = lambda sts: (tuple(np.stack(p) for p in zip(*sts)) if isinstance(sts[0], tuple)
                       else np.stack(sts))
  return np.stack(outs), [stack(s) for s in per_entry]


def _width(torch_weights, bidirectional):
  return torch_weights['weight_hh_l0'].shape[1] * (2 if bidirectional else 1)


def to_torch_layout(params):
  """jdl params -> PyTorch state-dict names and layout, in float64."""
  out = {}
  for module, p in params.items():
    suffix = '_reverse' if module.endswith('_reverse') else ''
    layer = module[len('layer'):].removesuffix('_reverse')
    out[f'weight_ih_l{layer}{suffix}'] = np.asarray(p['input_kernel'], np.float64).T
    out[f'weight_hh_l{layer}{suffix}'] = np.asarray(p['recurrent_kernel'], np.float64).T
    out[f'bias_ih_l{layer}{suffix}'] = np.asarray(p['input_bias'], np.float64)
    out[f'bias_hh_l{layer}{suffix}'] = np.asarray(p['recurrent_bias'], np.float64)
  return out


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def jit_apply(model):
  """model.apply compiled once per model (modules are hashable) and train flag."""
  return jax.jit(model.apply, static_argnames=('train',))


def random_params(model, x, seed=0, scale=0.5):
  """Parameters of the model's shapes, filled with N(0, scale^2) by NumPy.

  Random (not the init, whose biases are zero) so every bias and gate matters.
  """
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.randn(*s.shape), jnp.float32), shapes)


def inputs(batch=B, steps=T, features=F, seed=1):
  return np.random.RandomState(seed).randn(batch, steps, features).astype(np.float32)


def flat_states(states):
  """List of h / (h, c) -> flat list of arrays."""
  return [a for s in states for a in (s if isinstance(s, tuple) else (s,))]


def assert_states_close(got, want, atol):
  assert len(got) == len(want)
  for g, w in zip(flat_states(got), flat_states(want)):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=atol, rtol=0)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize('cell,activation', [('rnn', 'tanh'), ('rnn', 'relu'),
                                             ('lstm', 'tanh'), ('gru', 'tanh')])
def test_forward_matches_numpy(cell, activation):
  model = RNN(cell=cell, hidden_size=H, num_layers=2, bidirectional=True,
              activation=activation)
  x = inputs()
  params = random_params(model, x)
  out, states = jit_apply(model)({'params': params}, x)
  act = {'tanh': np.tanh, 'relu': lambda a: np.maximum(a, 0)}[activation]
  want_out, want_states = ref_batch(cell, x, to_torch_layout(params), 2, True, act=act)
  assert out.shape == (B, T, 2 * H)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=1e-5, rtol=0)
  assert_states_close(states, want_states, atol=1e-5)


def test_return_sequences_false_is_last_state():
  model = RNN(cell='lstm', hidden_size=H, num_layers=2, bidirectional=True,
              return_sequences=False)
  x = inputs()
  params = random_params(model, x)
  last, states = jit_apply(model)({'params': params}, x)
  want_out, want_states = ref_batch('lstm', x, to_torch_layout(params), 2, True)
  # Forward h after the last step, backward h after consuming step 0.
  want = np.concatenate([want_states[2][0], want_states[3][0]], axis=-1)
  assert last.shape == (B, 2 * H)
  np.testing.assert_allclose(np.asarray(last, np.float64), want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(want[:, :H], want_out[:, -1, :H], atol=1e-12)
  np.testing.assert_allclose(want[:, H:], want_out[:, 0, H:], atol=1e-12)


# ---------------------------------------------------------------- gradients and lengths
# Both use a 2-layer bidirectional model on B = 3 sequences of lengths (5, 2, 0)
# and share one compiled function per cell.

LENGTHS = np.array([T, 2, 0])


def masked_model(cell):
  return RNN(cell=cell, hidden_size=H, num_layers=2, bidirectional=True)


def loss_weights(cell, seed=2):
  """Fixed random weights r: loss = sum(outputs * r_out) + sum_k sum(state_k * r_k)."""
  rng = np.random.RandomState(seed)
  n_states = 4 * (2 if cell == 'lstm' else 1)  # 2 layers x 2 directions, h (and c)
  return rng.randn(3, T, 2 * H), [rng.randn(3, H) for _ in range(n_states)]


@functools.lru_cache(maxsize=None)
def outputs_and_grads(model):
  """Jitted (params, x, lengths, r_out, r_states) -> (outputs, states, dL/dparams, dL/dx)."""
  def loss(p, x, lengths, r_out, r_states):
    out, states = model.apply({'params': p}, x, lengths)
    total = jnp.sum(out * r_out)
    for s, r in zip(flat_states(states), r_states):
      total = total + jnp.sum(s * r)
    return total, (out, states)

  def run(*args):
    (g_params, g_x), (out, states) = jax.grad(loss, argnums=(0, 1), has_aux=True)(*args)
    return out, states, g_params, g_x
  return jax.jit(run)


def run_masked(cell, params, x):
  r_out, r_states = loss_weights(cell)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return outputs_and_grads(masked_model(cell))(
      params, f32(x), jnp.asarray(LENGTHS), f32(r_out), [f32(r) for r in r_states])


@pytest.mark.parametrize('cell', CELLS)
def test_gradients_match_finite_differences(cell):
  """jax.grad (float32) vs central differences of the float64 reference."""
  x = inputs(batch=3)
  params = random_params(masked_model(cell), x)
  _, _, g_params, g_x = run_masked(cell, params, x)
  r_out, r_states = loss_weights(cell)

  def ref_loss(p, xx):  # p: jdl-layout float64 params
    out, states = ref_batch(cell, xx, to_torch_layout(p), 2, True, LENGTHS)
    return np.sum(out * r_out) + sum(np.sum(s * r) for s, r in zip(flat_states(states), r_states))

  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x64 = x.astype(np.float64)
  eps = 1e-6  # float64 central difference: truncation ~eps^2, rounding ~1e-16/eps

  def central(array, index):
    old = array[index]
    array[index] = old + eps
    up = ref_loss(p64, x64)
    array[index] = old - eps
    down = ref_loss(p64, x64)
    array[index] = old
    return (up - down) / (2 * eps)

  rng = np.random.RandomState(3)
  checked = 0
  for module in p64:
    for name, array in p64[module].items():
      for _ in range(3):  # a few random coordinates of every parameter
        index = tuple(rng.randint(d) for d in array.shape)
        np.testing.assert_allclose(float(g_params[module][name][index]), central(array, index),
                                   rtol=1e-3, atol=1e-4, err_msg=f'{module}/{name}{index}')
        checked += 1
  assert checked == 3 * 4 * 4  # coordinates x parameters x (2 layers x 2 directions)
  for index in [(0, 0, 0), (0, 4, 2), (1, 1, 1), (1, 0, 2)]:  # valid steps
    np.testing.assert_allclose(float(g_x[index]), central(x64, index), rtol=1e-3, atol=1e-4,
                               err_msg=f'x{index}')


@pytest.mark.parametrize('cell', CELLS)
def test_lengths_mask_padding(cell):
  """Lengths (5, 2, 0), bidirectional, 2 layers: padding is invisible."""
  x = inputs(batch=3)
  params = random_params(masked_model(cell), x)
  out, states, g_params, g_x = run_masked(cell, params, x)

  # Outputs past each length are exactly zero, and the steps there get no gradient.
  for b, n in enumerate(LENGTHS):
    np.testing.assert_array_equal(np.asarray(out[b, n:]), 0.0)
    np.testing.assert_array_equal(np.asarray(g_x[b, n:]), 0.0)
  # Each sequence matches the reference run on that sequence alone, unpadded;
  # the backward direction starts at the last valid step; length 0 gives zeros.
  want_out, want_states = ref_batch(cell, x, to_torch_layout(params), 2, True, LENGTHS)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=1e-5, rtol=0)
  assert_states_close(states, want_states, atol=1e-5)
  for s in flat_states(states):
    np.testing.assert_array_equal(np.asarray(s[2]), 0.0)

  # Changing the padded inputs changes nothing: outputs, states, gradients.
  other = x.copy()
  other[1, 2:] = 100.0 * np.random.RandomState(7).randn(T - 2, F)
  other[2] = -50.0
  out2, states2, g_params2, g_x2 = run_masked(cell, params, other)
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
  for a, b in zip(flat_states(states2), flat_states(states)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(g_x2), np.asarray(g_x))
  for a, b in zip(jax.tree.leaves(g_params2), jax.tree.leaves(g_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unidirectional_lengths_final_state_is_last_valid_step():
  model = RNN(cell='gru', hidden_size=H)
  x = inputs()
  params = random_params(model, x)
  out_full, _ = jit_apply(model)({'params': params}, x)
  out, states = jit_apply(model)({'params': params}, x, np.array([T, 2]))
  # Valid steps agree with the unmasked run (same causal prefix) ...
  np.testing.assert_allclose(np.asarray(out[1, :2]), np.asarray(out_full[1, :2]), atol=1e-6)
  # ... and the final state is the output at step lengths - 1.
  np.testing.assert_allclose(np.asarray(states[0][1]), np.asarray(out_full[1, 1]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(states[0][0]), np.asarray(out_full[0, -1]), atol=1e-6)


# ---------------------------------------------------------------- shapes, counts


def layer_params(cell, fin, h):
  """Per layer and direction: G blocks of input kernel, recurrent kernel, 2 biases."""
  return GATES[cell] * (fin * h + h * h + 2 * h)


@pytest.mark.parametrize('cell', CELLS)
def test_shapes_and_param_counts(cell):
  x = jnp.zeros((B, T, F))
  single = RNN(cell=cell, hidden_size=H)
  params = jax.eval_shape(single.init, jax.random.key(0), x)['params']
  assert count_params(params) == layer_params(cell, F, H)
  assert set(params['layer0']) == {'input_kernel', 'recurrent_kernel', 'input_bias',
                                   'recurrent_bias'}
  g = GATES[cell]
  assert params['layer0']['input_kernel'].shape == (F, g * H)
  assert params['layer0']['recurrent_kernel'].shape == (H, g * H)

  stacked = RNN(cell=cell, hidden_size=H, num_layers=3, bidirectional=True)
  variables = jax.eval_shape(stacked.init, jax.random.key(0), x)
  params = variables['params']
  assert sorted(params) == sorted(f'layer{l}{s}' for l in range(3) for s in ('', '_reverse'))
  want = 2 * (layer_params(cell, F, H) + 2 * layer_params(cell, 2 * H, H))
  assert count_params(params) == want
  assert summarize(stacked, (T, F)).total_params == want

  out, states = jax.eval_shape(stacked.apply, variables, x)
  assert out.shape == (B, T, 2 * H)
  assert len(states) == 6
  for s in states:
    if cell == 'lstm':
      assert [a.shape for a in s] == [(B, H), (B, H)]
    else:
      assert s.shape == (B, H)

  last, _ = jax.eval_shape(stacked.clone(return_sequences=False).apply, variables, x)
  assert last.shape == (B, 2 * H)
  last, _ = jax.eval_shape(single.clone(return_sequences=False).apply,
                           jax.eval_shape(single.init, jax.random.key(0), x), x)
  assert last.shape == (B, H)


def test_unknown_cell_is_config_error():
  with pytest.raises(ConfigError, match='elman'):
    RNN(cell='elman')
  with pytest.raises(ConfigError, match='num_layers'):
    RNN(num_layers=0)


def test_init_follows_documented_scheme():
  """Forget-gate input bias 1, other biases 0, orthogonal recurrent kernel."""
  model = RNN(cell='lstm', hidden_size=H)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, T, F)))['params']['layer0']
  bias = np.asarray(params['input_bias'])
  np.testing.assert_array_equal(bias[H:2 * H], 1.0)
  np.testing.assert_array_equal(np.delete(bias, np.s_[H:2 * H]), 0.0)
  np.testing.assert_array_equal(np.asarray(params['recurrent_bias']), 0.0)
  w = np.asarray(params['recurrent_kernel'], np.float64)  # (H, 4H): orthonormal rows
  np.testing.assert_allclose(w @ w.T, np.eye(H), atol=1e-5)
  limit = np.sqrt(6.0 / (F + 4 * H))  # glorot-uniform bound
  assert np.abs(np.asarray(params['input_kernel'])).max() <= limit


# ---------------------------------------------------------------- dropout


def test_dropout_between_layers_only_in_train():
  x = inputs()
  model = RNN(cell='lstm', hidden_size=H, num_layers=2, dropout=0.5)
  params = random_params(model, x)
  apply = jit_apply(model)
  rng = lambda seed: {'dropout': jax.random.key(seed)}
  a, _ = apply({'params': params}, x, train=True, rngs=rng(0))
  b, _ = apply({'params': params}, x, train=True, rngs=rng(1))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  c, _ = apply({'params': params}, x, train=False, rngs=rng(0))
  d, _ = apply({'params': params}, x, train=False, rngs=rng(1))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
  want, _ = ref_batch('lstm', x, to_torch_layout(params), 2, False)
  np.testing.assert_allclose(np.asarray(c, np.float64), want, atol=1e-5, rtol=0)

  # One layer: nothing sits between layers, so train=True changes nothing.
  single = RNN(cell='lstm', hidden_size=H, dropout=0.5)
  p1 = {'layer0': params['layer0']}
  e, _ = jit_apply(single)({'params': p1}, x, train=True, rngs=rng(0))
  f, _ = jit_apply(single)({'params': p1}, x, train=False)
  np.testing.assert_array_equal(np.asarray(e), np.asarray(f))


# ---------------------------------------------------------------- PyTorch


def random_torch_state_dict(cell, num_layers, bidirectional, fin=F, h=H, seed=4):
  """Arrays shaped as torch.nn.{RNN,LSTM,GRU}.state_dict() holds them."""
  rng = np.random.RandomState(seed)
  d = 2 if bidirectional else 1
  gh = GATES[cell] * h
  out = {}
  for layer in range(num_layers):
    width = fin if layer == 0 else d * h
    for suffix in ('', '_reverse')[:d]:
      out[f'weight_ih_l{layer}{suffix}'] = 0.5 * rng.randn(gh, width)
      out[f'weight_hh_l{layer}{suffix}'] = 0.5 * rng.randn(gh, h)
      out[f'bias_ih_l{layer}{suffix}'] = 0.5 * rng.randn(gh)
      out[f'bias_hh_l{layer}{suffix}'] = 0.5 * rng.randn(gh)
  return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.mark.parametrize('cell', CELLS)
def test_converted_state_dict_matches_reference(cell):
  state = random_torch_state_dict(cell, 2, True)
  params = convert_torch_state_dict(state, cell, num_layers=2, bidirectional=True)
  model = RNN(cell=cell, hidden_size=H, num_layers=2, bidirectional=True)
  x = inputs()
  out, states = jit_apply(model)({'params': params}, x)
  torch64 = {k: v.astype(np.float64) for k, v in state.items()}  # used as is, no transpose
  want_out, want_states = ref_batch(cell, x, torch64, 2, True)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=1e-5, rtol=0)
  assert_states_close(states, want_states, atol=1e-5)


def test_converter_errors():
  state = random_torch_state_dict('gru', 2, False)
  convert_torch_state_dict(state, 'gru', 2, False)  # the good one converts

  missing = dict(state)
  del missing['bias_hh_l1']
  with pytest.raises(ConfigError, match='bias_hh_l1'):
    convert_torch_state_dict(missing, 'gru', 2, False)
  with pytest.raises(ConfigError, match='weight_ih_l0_reverse'):
    convert_torch_state_dict(state, 'gru', 2, True)
  bad = dict(state, weight_hh_l1=np.zeros((3 * H, H + 1), np.float32))
  with pytest.raises(ConfigError, match='weight_hh_l1'):
    convert_torch_state_dict(bad, 'gru', 2, False)
  with pytest.raises(ConfigError, match='weight_ih_l0'):  # an LSTM's 4H rows read as a GRU
    convert_torch_state_dict(random_torch_state_dict('lstm', 1, False), 'gru', 1, False)
  with pytest.raises(ConfigError, match='unexpected key .*_l1'):  # 2 layers read as 1
    convert_torch_state_dict(state, 'gru', 1, False)
  with pytest.raises(ConfigError, match='cell'):
    convert_torch_state_dict(state, 'elman', 2, False)
  for err in ('missing', 'shape'):  # messages stay one line
    try:
      convert_torch_state_dict(missing if err == 'missing' else bad, 'gru', 2, False)
    except ConfigError as e:
      assert '\n' not in str(e)


@pytest.mark.parametrize('cell', CELLS)
def test_matches_torch(cell):
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  cls = {'rnn': torch.nn.RNN, 'lstm': torch.nn.LSTM, 'gru': torch.nn.GRU}[cell]
  net = cls(F, H, num_layers=2, batch_first=True, bidirectional=True)
  x = inputs()
  with torch.no_grad():
    want, _ = net(torch.from_numpy(x))
  params = convert_torch_state_dict(net.state_dict(), cell, 2, True)
  out, _ = jit_apply(RNN(cell=cell, hidden_size=H, num_layers=2, bidirectional=True))(
      {'params': params}, x)
  np.testing.assert_allclose(np.asarray(out), want.numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- classifier


def test_classifier_shapes_and_dtypes():
  model = RNNClassifier(cell='gru', hidden_size=H, bidirectional=True, num_classes=7,
                        dtype=jnp.bfloat16)
  x2d = inputs()[..., 0]  # (B, T): taken as F = 1
  params = random_params(model, x2d)
  assert params['rnn']['layer0']['input_kernel'].shape == (1, 3 * H)
  assert params['head']['kernel'].shape == (2 * H, 7)
  logits, features = jit_apply(model)({'params': params}, x2d, np.array([T, 3]))
  assert logits.shape == (B, 7)
  assert logits.dtype == jnp.float32
  assert features['pre_logits'].shape == (B, 2 * H)
  assert features['sequence'].shape == (B, T, 2 * H)
  assert features['sequence'].dtype == jnp.bfloat16
  # The parameters stay float32 under a bfloat16 compute dtype.
  variables = jax.eval_shape(model.init, jax.random.key(0), x2d)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

  # bfloat16 compute stays close to the float32 reference (8 mantissa bits).
  want_out, _ = ref_batch('gru', x2d[..., None], to_torch_layout(params['rnn']), 1, True,
                          lengths=[T, 3])
  np.testing.assert_allclose(np.asarray(features['sequence'], np.float64), want_out,
                             atol=5e-2, rtol=0)


# ------------------------------------------------ hand-written LSTM gradient


def plain_lstm_scan(xs, w_h, valid):
  """The LSTM recurrence as the straightforward scan; JAX differentiates it."""
  hidden = w_h.shape[0]
  zeros = jnp.zeros((xs.shape[1], hidden))

  def body(carry, inputs):
    h, c = carry
    x_t, m = inputs
    i, f, g, o = jnp.split(x_t + h @ w_h, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    keep = m > 0
    return ((jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)),
            jnp.where(keep, h_new, 0.0))

  ones = jnp.ones(xs.shape[:2] + (1,))
  carry, ys = jax.lax.scan(body, (zeros, zeros), (xs, ones if valid is None else valid))
  return ys, carry


@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('loop', ['ops.lstm_layer', 'rnn.lstm_scan'])
def test_lstm_loops_equal_autodiff_of_the_plain_scan(masked, loop):
  """Every output and gradient entry (inputs, both kernels, the bias) of the
  CPU kernel's hand-written VJP and of the models' plain loop, against jax.grad
  of the input projection and this file's plain scan."""
  from jdl.models import rnn
  from jdl.ops.recurrence import lstm_layer
  lstm_layer = lstm_layer if loop == 'ops.lstm_layer' else rnn.lstm_scan
  steps, batch, features, hidden = 6, 4, 3, 5
  rng = np.random.RandomState(7)
  x = jnp.asarray(rng.randn(steps, batch, features), jnp.float32)
  w_i = jnp.asarray(rng.randn(features, 4 * hidden) * 0.5, jnp.float32)
  b = jnp.asarray(rng.randn(4 * hidden) * 0.5, jnp.float32)
  w_h = jnp.asarray(rng.randn(hidden, 4 * hidden) * 0.5, jnp.float32)
  lengths = np.array([6, 3, 1, 0])
  valid = (jnp.asarray(np.arange(steps)[:, None] < lengths[None, :], jnp.float32)[..., None]
           if masked else None)
  r_ys = jnp.asarray(rng.randn(steps, batch, hidden), jnp.float32)
  r_h, r_c = (jnp.asarray(rng.randn(batch, hidden), jnp.float32) for _ in range(2))
  plain = lambda x, w_i, b, w_h, valid: plain_lstm_scan(x @ w_i + b[None, None, :], w_h, valid)

  def loss(fn, *args):
    ys, (h, c) = fn(*args, valid)
    return jnp.sum(ys * r_ys) + jnp.sum(h * r_h) + jnp.sum(jnp.sin(c) * r_c), (ys, h, c)

  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3),
                                     has_aux=True))
  got, got_out = grad(lstm_layer)(x, w_i, b, w_h)
  want, want_out = grad(plain)(x, w_i, b, w_h)
  for g, w in zip(got_out + got, want_out + want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6, rtol=1e-5)
  if masked:  # nothing flows into the inputs past each length
    assert not np.any(np.asarray(got[0])[np.asarray(valid)[..., 0] == 0])


# ---------------------------------------------------------------- cuDNN LSTM
# jax.experimental.rnn.lstm runs only on a CUDA GPU. On CPU its pure-JAX
# reference, lstm_ref, stands in for the kernel: jax's own tests check the
# kernel against it on the same flat weights, so equal results here mean the
# packing, gate order, reversal and lengths are right.


def cudnn_by_reference(x, weights, lengths, hidden_size):
  from jax.experimental import rnn as cudnn_rnn
  batch, _, features = x.shape
  w_ih, w_hh, b_ih, b_hh = cudnn_rnn.unpack_lstm_weights(weights, features, hidden_size, 1, False)
  zeros = jnp.zeros((1, batch, hidden_size))
  ys, h, c = cudnn_rnn.lstm_ref(x, zeros, zeros, w_ih, w_hh, b_ih, b_hh, lengths, features,
                                hidden_size, 1, 0.0, False)
  return ys, (h[0], c[0])


def test_pack_cudnn_lstm_layout():
  from jax.experimental import rnn as cudnn_rnn
  from jdl.models.rnn import pack_cudnn_lstm
  rng = np.random.RandomState(0)
  w_i, w_h = rng.randn(F, 4 * H), rng.randn(H, 4 * H)
  b_i, b_h = rng.randn(4 * H), rng.randn(4 * H)
  flat = pack_cudnn_lstm(*(jnp.asarray(a, jnp.float32) for a in (w_i, w_h, b_i, b_h)))
  assert flat.shape == (cudnn_rnn.get_num_params_in_lstm(F, H, 1, False),)
  got = cudnn_rnn.unpack_lstm_weights(flat, F, H, 1, False)
  for g, want in zip(got, (w_i.T, w_h.T, b_i, b_h)):  # cuDNN holds PyTorch's (4H, F) layout
    np.testing.assert_allclose(np.asarray(g[0]), want, rtol=1e-6)


def test_cudnn_implementation_equals_scan(monkeypatch):
  """2 layers, bidirectional, lengths (5, 2, 0): outputs, states and gradients."""
  import jdl.models.rnn as rnn_lib
  monkeypatch.setattr(rnn_lib, '_cudnn_lstm', cudnn_by_reference)
  x = inputs(batch=3)
  lengths = jnp.asarray([T, 2, 0], jnp.int32)
  models = [RNN(cell='lstm', hidden_size=H, num_layers=2, bidirectional=True, implementation=i)
            for i in ('scan', 'cudnn')]
  params = random_params(models[0], x)

  def loss(p, model, lengths):
    out, states = model.apply({'params': p}, x, lengths)
    return jnp.sum(out ** 2) + sum(jnp.sum(jnp.sin(a)) for a in flat_states(states)), (out, states)

  for lens in (None, lengths):
    (_, (want_out, want_states)), want_grad = jax.value_and_grad(loss, has_aux=True)(
        params, models[0], lens)
    (_, (got_out, got_states)), got_grad = jax.value_and_grad(loss, has_aux=True)(
        params, models[1], lens)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5)
    for g, w in zip(flat_states(got_states), flat_states(want_states)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4),
                 got_grad, want_grad)


def test_cudnn_implementation_errors():
  with pytest.raises(ConfigError, match="unknown rnn implementation 'fused'"):
    RNN(cell='lstm', implementation='fused')
  with pytest.raises(ConfigError, match="only the lstm cell, not 'gru'"):
    RNN(cell='gru', implementation='cudnn')
  with pytest.raises(ConfigError, match='float32 only, not bfloat16'):
    RNN(cell='lstm', implementation='cudnn', dtype=jnp.bfloat16)
  if jax.default_backend() != 'gpu':
    model = RNN(cell='lstm', hidden_size=H, implementation='cudnn')
    with pytest.raises(ConfigError, match="needs a CUDA GPU, but the JAX backend is 'cpu'"):
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T, F)))


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='the cuDNN kernel needs a CUDA GPU')
def test_cudnn_kernel_equals_scan_on_gpu():
  x = inputs(batch=3)
  lengths = jnp.asarray([T, 2, 1], jnp.int32)
  models = [RNN(cell='lstm', hidden_size=H, num_layers=2, bidirectional=True, implementation=i)
            for i in ('scan', 'cudnn')]
  params = random_params(models[0], x)
  with jax.default_matmul_precision('highest'):  # no TF32 on either side
    for lens in (None, lengths):
      grads = [jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x, lens)[0] ** 2))(params)
               for m in models]
      outs = [m.apply({'params': params}, x, lens)[0] for m in models]
      np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), atol=1e-5)
      jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4),
                   grads[1], grads[0])
