"""Optimizers and learning-rate schedules, chosen by name, built from optax.

Optimizers. `make_optimizer` assembles one optax chain for every name:

  clip_by_global_norm(clip_norm)        # optional, on the raw gradient g
  -> direction                          # from OPTIMIZERS[name]: d = D(g)
  -> add_decayed_weights(wd, kernels)   # only when weight_decay > 0
  -> scale_by_learning_rate(lr)         # lr: a float or a schedule of the step

so one step is  w <- w - lr_t * (D(clip(g)) + wd * w * [w is a kernel]).

The registry holds only the direction D, built from optax's own transforms, and
with weight_decay = 0 each chain is the optax alias of the same name:

  sgd       D(g) = g                            == optax.sgd(lr)
  momentum  t' = g + m t;  D = t'               == optax.sgd(lr, m)
  nesterov  t' = g + m t;  D = g + m t'         == optax.sgd(lr, m, nesterov=True)
  adagrad   s = s + g^2 (s_0 = 0.1);  D = g / sqrt(s + eps), eps = 1e-7
                                                == optax.adagrad(lr)
  rmsprop   v = 0.9 v + 0.1 g^2 (v_0 = 0);  D = g / sqrt(v + eps), eps = 1e-7
                                                == optax.rmsprop(lr, 0.9, eps=1e-7)
  adam      Kingma & Ba with bias correction, D = m_hat / (sqrt(v_hat) + eps),
            eps = 1e-8                          == optax.adam(lr, b1, b2)
  adamw     adam's D; with weight_decay this chain is exactly optax.adamw(lr,
            b1, b2, weight_decay=wd, mask=kernel_mask).

RMSprop follows Keras (keras.optimizers.RMSprop: rho 0.9, epsilon 1e-7 INSIDE
the square root, v_0 = 0). optax.rmsprop also puts eps inside the root
(eps_in_sqrt=True) but defaults to eps = 1e-8; PyTorch puts it outside,
g / (sqrt(v) + 1e-8), with decay 0.99. Inside the root the denominator never
drops below sqrt(eps) (3.2e-4 for 1e-7), outside never below eps itself, so
the placements differ for tiny gradients and agree once v >> eps. Adagrad keeps optax's defaults,
which are Keras's too: s_0 = 0.1 and eps = 1e-7 inside the root, so its first
step is g / sqrt(0.1 + g^2), not the sign of g.

Weight decay is decoupled (Loshchilov & Hutter, AdamW): it is added after the
direction, so it bypasses momentum and adaptive scaling, and it is multiplied
by the current learning rate, as optax.adamw does. It applies to kernels only
(ndim >= 2, `jdl.losses.kernel_mask`). For coupled L2 regularization add
`l2 * jdl.losses.l2_penalty(params)` to the loss instead. With weight_decay > 0
the chain needs the params: `tx.update(grads, opt_state, params)`.

Schedules. `make_schedule` returns an optax.Schedule, step -> learning rate,
where a step is one optimizer update; the names are listed in SCHEDULES.
"""
from typing import Callable, Optional, Sequence, Union

import jax.numpy as jnp
import optax

from jdl.errors import ConfigError
from jdl.losses import kernel_mask
from jdl.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")

# Keras RMSprop defaults (see the module docstring).
RMSPROP_DECAY = 0.9  # rho: weight of the old mean square in each update
RMSPROP_EPS = 1e-7  # added to v inside the root: g / sqrt(v + eps)
ADAGRAD_EPS = 1e-7  # optax and Keras default, inside the root
ADAGRAD_INITIAL_ACCUMULATOR = 0.1  # optax and Keras default
ADAM_EPS = 1e-8  # optax, PyTorch and the Adam paper (Keras uses 1e-7)

# ----------------------------------------------------------------------------
# Optimizers: each entry maps the shared hyperparameters to the direction D.
# ----------------------------------------------------------------------------


@OPTIMIZERS.register("sgd")
def _sgd(**_):
  return optax.identity()


@OPTIMIZERS.register("momentum")
def _momentum(*, momentum, **_):
  return optax.trace(decay=momentum)


@OPTIMIZERS.register("nesterov")
def _nesterov(*, momentum, **_):
  return optax.trace(decay=momentum, nesterov=True)


@OPTIMIZERS.register("adagrad")
def _adagrad(*, eps, **_):
  return optax.scale_by_rss(
      initial_accumulator_value=ADAGRAD_INITIAL_ACCUMULATOR,
      eps=ADAGRAD_EPS if eps is None else eps)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(*, eps, **_):
  return optax.scale_by_rms(
      decay=RMSPROP_DECAY, eps=RMSPROP_EPS if eps is None else eps,
      initial_scale=0.0, eps_in_sqrt=True)


def _adam(*, b1, b2, eps, **_):
  return optax.scale_by_adam(b1=b1, b2=b2, eps=ADAM_EPS if eps is None else eps)


OPTIMIZERS.register("adam", _adam)
OPTIMIZERS.register("adamw", _adam)  # Differs from adam only by weight_decay.


def make_optimizer(
    name: str,
    learning_rate: Union[float, optax.Schedule],
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    clip_norm: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: Optional[float] = None,
) -> optax.GradientTransformation:
  """The optax optimizer called `name` (see the module docstring for formulas).

  Arguments:
    name: one of OPTIMIZERS.names(); an unknown name raises ConfigError.
    learning_rate: step size, a float or an optax schedule (step -> float).
    momentum: trace decay of "momentum" and "nesterov"; ignored by the others.
    weight_decay: decoupled decay coefficient wd for kernels (ndim >= 2); the
      step subtracts lr * wd * w. 0 turns it off. Usually set with "adamw".
    clip_norm: if set, gradients are first scaled by min(1, clip_norm /
      ||g||_2), the norm taken over all leaves together.
    b1, b2: Adam's decay rates of the first and second moments.
    eps: stability term; None uses each optimizer's default (module constants).

  Returns:
    An optax.GradientTransformation.
  """
  direction = OPTIMIZERS.lookup(name)(momentum=momentum, b1=b1, b2=b2, eps=eps)
  return optax.chain(
      optax.clip_by_global_norm(clip_norm) if clip_norm is not None
      else optax.identity(),
      direction,
      optax.add_decayed_weights(weight_decay, mask=kernel_mask) if weight_decay
      else optax.identity(),
      optax.scale_by_learning_rate(learning_rate),
  )


# ----------------------------------------------------------------------------
# Schedules: each entry gets the learning rate, total_steps and the resolved
# options of make_schedule as keywords, and uses the ones it needs.
# ----------------------------------------------------------------------------


@SCHEDULES.register("constant")
def _constant(lr, total_steps, **_):
  return optax.constant_schedule(lr)


@SCHEDULES.register("inverse_time")
def _inverse_time(lr, total_steps, *, decay_rate, decay_steps, **_):
  # Keras InverseTimeDecay (staircase=False); optax has no equivalent.
  def schedule(step):
    return lr / (1.0 + decay_rate * jnp.asarray(step, jnp.float32) / decay_steps)
  return schedule


@SCHEDULES.register("exponential")
def _exponential(lr, total_steps, *, decay_rate, decay_steps, **_):
  # lr * decay_rate ** (step / decay_steps), continuous (not staircase).
  return optax.exponential_decay(lr, transition_steps=decay_steps,
                                 decay_rate=decay_rate)


@SCHEDULES.register("cosine")
def _cosine(lr, total_steps, *, alpha, **_):
  # lr * (alpha + (1 - alpha) * (1 + cos(pi * step / total_steps)) / 2),
  # held at alpha * lr after total_steps.
  return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=alpha)


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine(lr, total_steps, *, warmup_steps, alpha, **_):
  # Linear 0 -> lr over warmup_steps, then cosine lr -> alpha * lr over the
  # remaining total_steps - warmup_steps.
  if warmup_steps >= total_steps:
    raise ConfigError(f"warmup_steps ({warmup_steps}) must be below total_steps "
                      f"({total_steps}) for the warmup_cosine schedule")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=alpha * lr)


@SCHEDULES.register("piecewise")
def _piecewise(lr, total_steps, *, boundaries, scale, **_):
  # From step int(b * total_steps) on, for each b in boundaries, the rate is
  # multiplied by `scale` once more: lr, lr * scale, lr * scale^2, ...
  scales = {}
  for b in boundaries:
    if not 0.0 < b < 1.0:
      raise ConfigError(f"piecewise boundaries are fractions of total_steps in "
                        f"(0, 1), got {tuple(boundaries)}")
    step = int(b * total_steps)
    scales[step] = scales.get(step, 1.0) * scale  # Two boundaries, one step.
  return optax.piecewise_constant_schedule(lr, scales)


@SCHEDULES.register("one_cycle")
def _one_cycle(lr, total_steps, *, warmup_steps, **_):
  # optax's linear one-cycle (Smith & Topin): lr / 25 -> lr linearly over the
  # warmup, back to lr / 25 at 85% of total_steps, then to lr / 25 / 1e4 at
  # total_steps.
  pct_start = warmup_steps / total_steps
  if pct_start >= 0.85:
    raise ConfigError(f"warmup_steps ({warmup_steps}) must be below 85% of "
                      f"total_steps ({total_steps}) for the one_cycle schedule")
  return optax.linear_onecycle_schedule(total_steps, peak_value=lr,
                                        pct_start=pct_start, pct_final=0.85)


def make_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    *,
    decay_rate: float = 0.5,
    decay_steps: Optional[int] = None,
    warmup_steps: Optional[int] = None,
    boundaries: Sequence[float] = (0.5, 0.75),
    scale: float = 0.1,
    alpha: float = 0.0,
) -> optax.Schedule:
  """The learning-rate schedule called `name`, a function step -> rate.

  Arguments:
    name: one of SCHEDULES.names(); an unknown name raises ConfigError.
    learning_rate: base (or peak) rate.
    total_steps: number of optimizer updates in the whole run (>= 1).
    decay_rate: "exponential": factor per decay_steps; "inverse_time": rate at
      which 1 / (1 + decay_rate * step / decay_steps) shrinks.
    decay_steps: steps per decay_rate; default max(total_steps // 10, 1).
    warmup_steps: linear warm-up of "warmup_cosine" and "one_cycle"; default
      5% of total_steps (rounded down).
    boundaries: "piecewise": fractions of total_steps where the rate drops.
    scale: "piecewise": factor applied at each boundary.
    alpha: "cosine", "warmup_cosine": final rate as a fraction of the base.

  Returns:
    An optax.Schedule (step -> float32 rate), usable as make_optimizer's
    learning_rate.
  """
  build = SCHEDULES.lookup(name)
  if total_steps < 1:
    raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
  if decay_steps is None:
    decay_steps = max(total_steps // 10, 1)
  if decay_steps < 1:
    raise ConfigError(f"decay_steps must be >= 1, got {decay_steps}")
  if warmup_steps is None:
    warmup_steps = int(0.05 * total_steps)
  if warmup_steps < 0:
    raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
  return build(learning_rate, total_steps, decay_rate=decay_rate,
               decay_steps=decay_steps, warmup_steps=warmup_steps,
               boundaries=tuple(boundaries), scale=scale, alpha=alpha)


# ----------------------------------------------------------------------------
# Freezing: parameters chosen by path get no update at all.
# ----------------------------------------------------------------------------

def path_of(key_path) -> str:
  """'backbone/layer1_0/conv1/kernel' for a jax tree key path."""
  def name(key):
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return "/".join(name(k) for k in key_path)


def path_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
  """A predicate on parameter paths: True when any regex in `patterns` matches.

  Paths look like 'backbone/layer1_0/conv1/kernel' (module names joined by '/');
  patterns use `re.search`, so '^backbone/' freezes a whole submodule and
  'bn' every BatchNorm. A bad regex is a ConfigError.
  """
  import re
  try:
    compiled = [re.compile(p) for p in patterns]
  except re.error as e:
    raise ConfigError(f"bad freeze pattern {e.pattern!r}: {e}") from None
  return lambda path: any(c.search(path) for c in compiled)


def frozen_mask(tree, patterns: Sequence[str]):
  """A tree of Python bools like `tree`: True where the leaf's path matches."""
  import jax
  matches = path_matcher(patterns)
  return jax.tree_util.tree_map_with_path(lambda kp, _: matches(path_of(kp)), tree)


def freeze(tx: optax.GradientTransformation, params, patterns: Sequence[str]
           ) -> optax.GradientTransformation:
  """`tx` for the parameters not matching `patterns`; zero updates for the rest.

  Built with optax.multi_transform + set_to_zero, so frozen parameters keep no
  optimizer state and stay bit-identical (p + 0 == p), weight decay included.
  Every pattern must match at least one parameter (a typo would otherwise
  silently train everything).

  Arguments:
    tx: the optimizer of the trainable parameters.
    params: the parameter tree (arrays or ShapeDtypeStructs).
    patterns: regexes on parameter paths, see `path_matcher`.
  """
  import jax
  paths = [path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
  for pattern in patterns:
    if not any(path_matcher([pattern])(p) for p in paths):
      raise ConfigError(f"freeze pattern {pattern!r} matches no parameter; paths look like "
                        f"{', '.join(paths[:3])}")
  labels = jax.tree.map(lambda frozen: "frozen" if frozen else "trainable",
                        frozen_mask(params, patterns))
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
