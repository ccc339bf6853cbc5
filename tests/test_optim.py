"""Optimizers and schedules against hand-written NumPy update rules."""
import jax
import numpy as np
import optax
import pytest

from jdl import optim
from jdl.errors import ConfigError

LR = 0.1
# Curvatures of the quadratic f(w) = 0.5 * sum(A * w^2), so grad = A * w.
# "norm/scale" has gradients of 1e-3 and 1e-2, small enough that where eps sits
# (inside or outside a square root) changes rmsprop's step.
A = {"dense": {"kernel": np.array([[1.0, 2.0, 0.5], [3.0, 0.1, 1.5]]),
               "bias": np.array([0.2, 4.0, 1.0])},
     "norm": {"scale": np.array([1e-3, 1e-2])}}
W0 = {"dense": {"kernel": np.array([[1.0, -2.0, 0.5], [0.3, 1.0, -1.5]]),
                "bias": np.array([0.5, -1.0, 2.0])},
      "norm": {"scale": np.array([1.0, 1.0])}}


def _grad(w):
  return jax.tree.map(lambda a, x: (a.astype(np.float32) * x), A, w)


def _run_jdl(tx, steps):
  """`steps` updates of `tx` on the quadratic, in float32 JAX (one jit)."""
  def run(params):
    state = tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(_grad(params), state, params)
      params = optax.apply_updates(params, updates)
    return params
  return jax.jit(run)(jax.tree.map(lambda x: np.asarray(x, np.float32), W0))


def _run_numpy(rule, steps):
  """`steps` updates by `rule(g, state, t) -> (direction, state)` per leaf, float64.

  The step is w <- w - LR * direction, as every optimizer here.
  """
  leaves, treedef = jax.tree.flatten(W0)
  curv = jax.tree.leaves(A)
  ws = [w.astype(np.float64) for w in leaves]
  states = [None] * len(ws)
  for t in range(1, steps + 1):
    for i, (w, a) in enumerate(zip(ws, curv)):
      d, states[i] = rule(a * w, states[i], t)
      ws[i] = w - LR * d
  return jax.tree.unflatten(treedef, ws)


def _sgd(g, s, t):
  return g, s


def _momentum(g, s, t, m=0.9):
  s = g + m * (0.0 if s is None else s)
  return s, s


def _nesterov(g, s, t, m=0.9):
  s = g + m * (0.0 if s is None else s)
  return g + m * s, s


def _adagrad(g, s, t):
  s = (0.1 if s is None else s) + g ** 2  # Accumulator starts at 0.1.
  return g / np.sqrt(s + 1e-7), s


def _rmsprop(g, s, t):
  v = 0.9 * (0.0 if s is None else s) + 0.1 * g ** 2
  return g / np.sqrt(v + 1e-7), v


def _adam(g, s, t, b1=0.9, b2=0.999, eps=1e-8):
  m, v = (0.0, 0.0) if s is None else s
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g ** 2
  m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
  return m_hat / (np.sqrt(v_hat) + eps), (m, v)


RULES = {"sgd": _sgd, "momentum": _momentum, "nesterov": _nesterov,
         "adagrad": _adagrad, "rmsprop": _rmsprop, "adam": _adam, "adamw": _adam}


def _close(got, want, rtol=1e-5, atol=5e-6):
  # atol: float32 Adam loses ~1e-5 of a step in 1 - b2^t = 1 - 0.999^t.
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(RULES))
def test_optimizer_matches_numpy(name):
  got = _run_jdl(optim.make_optimizer(name, LR), steps=2)
  _close(got, _run_numpy(RULES[name], steps=2))
  # The test can fail: the parameters did move.
  assert not np.allclose(got["dense"]["kernel"], W0["dense"]["kernel"])


def test_registry_names():
  assert optim.OPTIMIZERS.names() == sorted(RULES)
  assert set(optim.SCHEDULES.names()) == {
      "constant", "inverse_time", "exponential", "cosine", "warmup_cosine",
      "piecewise", "one_cycle"}


@pytest.mark.parametrize("name,alias", [
    ("sgd", optax.sgd(LR)),
    ("momentum", optax.sgd(LR, momentum=0.9)),
    ("nesterov", optax.sgd(LR, momentum=0.9, nesterov=True)),
    ("adagrad", optax.adagrad(LR)),
    ("rmsprop", optax.rmsprop(LR, decay=0.9, eps=1e-7)),
    ("adam", optax.adam(LR)),
])
def test_optimizer_equals_optax_alias(name, alias):
  _close(_run_jdl(optim.make_optimizer(name, LR), 3), _run_jdl(alias, 3), rtol=1e-6)


def test_rmsprop_keras_example():
  # keras.optimizers.RMSprop docstring: lr 0.1, loss var^2 / 2, var 10 -> 9.683772.
  tx = optim.make_optimizer("rmsprop", 0.1)
  w = np.float32(10.0)
  updates, _ = tx.update(w, tx.init(w), w)
  np.testing.assert_allclose(w + updates, 9.683772, rtol=1e-6)


def test_adamw_decays_kernels_only():
  wd = 0.05
  got = _run_jdl(optim.make_optimizer("adamw", LR, weight_decay=wd), steps=2)

  # NumPy: the kernel gets adam's direction plus wd * w; bias and scale none.
  leaves, treedef = jax.tree.flatten(W0)
  want = []
  for w, a in zip(leaves, jax.tree.leaves(A)):
    decay = wd if w.ndim >= 2 else 0.0
    s = None
    for t in (1, 2):
      d, s = _adam(a * w, s, t)
      w = w - LR * (d + decay * w)
    want.append(w)
  _close(got, jax.tree.unflatten(treedef, want))
  # Same as optax.adamw with the kernel mask, and the bias equals plain adam.
  _close(got, _run_jdl(optax.adamw(LR, weight_decay=wd,
                                   mask=optim.kernel_mask), 2), rtol=1e-6)
  plain = _run_jdl(optim.make_optimizer("adam", LR), steps=2)
  np.testing.assert_allclose(got["dense"]["bias"], plain["dense"]["bias"])
  np.testing.assert_allclose(got["norm"]["scale"], plain["norm"]["scale"])
  assert not np.allclose(got["dense"]["kernel"], plain["dense"]["kernel"])


def test_weight_decay_with_momentum_is_decoupled():
  # w <- w - lr * (trace + wd * w): the decay does not enter the trace.
  wd, m = 0.1, 0.9
  got = _run_jdl(optim.make_optimizer("momentum", LR, weight_decay=wd), steps=2)
  w = W0["dense"]["kernel"].copy()
  trace = 0.0
  for _ in range(2):
    trace = A["dense"]["kernel"] * w + m * trace
    w = w - LR * (trace + wd * w)
  np.testing.assert_allclose(got["dense"]["kernel"], w, rtol=1e-5)


def test_clip_by_global_norm():
  g = _grad(W0)
  norm = np.sqrt(sum((x ** 2).sum() for x in jax.tree.leaves(g)))
  for clip in (norm / 4, norm * 2):  # One clipped, one left alone.
    tx = optim.make_optimizer("sgd", LR, clip_norm=clip)
    updates, _ = jax.jit(tx.update)(jax.tree.map(np.float32, g), tx.init(W0), W0)
    factor = min(1.0, clip / norm)
    _close(updates, jax.tree.map(lambda x: -LR * factor * x, g))


def test_schedule_as_learning_rate():
  sched = optim.make_schedule("exponential", LR, 100, decay_steps=1)
  got = _run_jdl(optim.make_optimizer("sgd", sched), steps=2)
  w = W0["dense"]["bias"]
  for t in range(2):  # Step t uses sched(t) = LR * 0.5^t.
    w = w - LR * 0.5 ** t * A["dense"]["bias"] * w
  np.testing.assert_allclose(got["dense"]["bias"], w, rtol=1e-5)


def test_unknown_names_raise_config_error():
  with pytest.raises(ConfigError, match="adam.*sgd"):
    optim.make_optimizer("adamm", LR)
  with pytest.raises(ConfigError, match="cosine"):
    optim.make_schedule("cosin", LR, 100)


# ----------------------------------------------------------------------------
# Schedules vs closed forms.
# ----------------------------------------------------------------------------

T = 200
STEPS = np.array([0, 1, 7, 10, 50, 99, 100, 101, 149, 150, 151, 170, 199, 200, 250])


def _cos(frac):
  return 0.5 * (1 + np.cos(np.pi * np.clip(frac, 0.0, 1.0)))


CLOSED_FORMS = {
    # name: (make_schedule kwargs, closed form of the step s)
    "constant": ({}, lambda s: LR + 0 * s),
    "inverse_time": ({"decay_rate": 0.5}, lambda s: LR / (1 + 0.5 * s / 20)),
    "exponential": ({"decay_rate": 0.5, "decay_steps": 30},
                    lambda s: LR * 0.5 ** (s / 30)),
    "cosine": ({"alpha": 0.1}, lambda s: LR * (0.1 + 0.9 * _cos(s / T))),
    "warmup_cosine": ({"warmup_steps": 10, "alpha": 0.0}, lambda s: np.where(
        s < 10, LR * s / 10, LR * _cos((s - 10) / (T - 10)))),
    "piecewise": ({"boundaries": (0.5, 0.75), "scale": 0.1},
                  lambda s: LR * 0.1 ** ((s >= 100).astype(int) + (s >= 150))),
    "one_cycle": ({"warmup_steps": 60}, lambda s: np.interp(
        s, [0, 60, 170, T], [LR / 25, LR, LR / 25, LR / 25 / 1e4])),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_schedule_closed_form(name):
  kwargs, closed = CLOSED_FORMS[name]
  sched = optim.make_schedule(name, LR, T, **kwargs)
  got = np.asarray(jax.jit(jax.vmap(sched))(STEPS))  # One compile, all steps.
  # atol: float32 cos near the end of a cosine, where the rate is ~1e-5.
  np.testing.assert_allclose(got, closed(STEPS.astype(np.float64)), rtol=1e-5,
                             atol=1e-8)


def test_schedule_defaults():
  # decay_steps defaults to total_steps // 10, warmup_steps to 5%.
  inv = optim.make_schedule("inverse_time", LR, T)
  np.testing.assert_allclose(float(inv(40)), LR / (1 + 0.5 * 40 / 20), rtol=1e-6)
  wc = optim.make_schedule("warmup_cosine", LR, T)
  np.testing.assert_allclose(float(wc(5)), LR * 5 / 10, rtol=1e-6)
  np.testing.assert_allclose(float(wc(10)), LR, rtol=1e-6)


def test_schedule_bad_options():
  with pytest.raises(ConfigError):
    optim.make_schedule("warmup_cosine", LR, 10, warmup_steps=10)
  with pytest.raises(ConfigError):
    optim.make_schedule("piecewise", LR, 10, boundaries=(0.5, 1.5))
  with pytest.raises(ConfigError):
    optim.make_schedule("cosine", LR, 0)
