"""What every training task builds on: the state, its variables, the keys and the guarded update.

  TrainState          Flax's TrainState plus BatchNorm statistics: params,
                      batch_stats, optimizer state and step, a small pytree.
  model_variables     {'params', 'batch_stats'?} of a state, for `apply`.
  init_variables      a model's fresh variables for one example's shape.
  PRNG_IMPL           the key implementation of every run.
  keep_if, step_status, apply_if_finite
                      the non-finite guard inside a jitted step: a step whose
                      loss or gradients are not finite is not applied, and
                      says which it was (the loop then stops or counts).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

# The run's PRNG: XLA's RngBitGenerator for random bits. Deterministic for a
# given backend like threefry, but its programs compile several times faster
# on XLA:CPU (BUILD_NOTES.md), and threefry's compile would be most of a small
# model's time to first step.
PRNG_IMPL = "rbg"


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics (None for models without)."""
  batch_stats: Any = None


def model_variables(state: TrainState, params=None) -> dict:
  """{'params': params (default state.params), 'batch_stats'?} for `state.apply_fn`."""
  variables = {"params": state.params if params is None else params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  return variables


def init_variables(model, input_shape, rng) -> dict:
  """Fresh {'params', 'batch_stats'?} of `model` for (1, *input_shape) float inputs."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init({"params": rng}, jnp.zeros((1, *input_shape), jnp.float32))


def keep_if(ok, new, old):
  """`new` where the scalar `ok` is true, else `old`, leaf by leaf (inside jit: a select per leaf)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def step_status(loss, grad_norm):
  """(ok, status) of one step: status int32 0 good, 1 non-finite loss, 2 finite loss but
  non-finite gradients (`grad_norm` is their global norm, non-finite if any is)."""
  loss_finite = jnp.isfinite(loss)
  ok = loss_finite & jnp.isfinite(grad_norm)
  return ok, jnp.where(ok, 0, jnp.where(loss_finite, 2, 1)).astype(jnp.int32)


def apply_if_finite(state: TrainState, grads, loss, **changes):
  """The guarded update: `state.apply_gradients(grads, **changes)` if `loss` and
  `grads` are finite, else `state` with only its step counter moved (so step
  numbers, and the keys folded from them, stay aligned).

  Returns:
    (state, status int32 as `step_status`, the gradients' global norm).
  """
  grad_norm = optax.global_norm(grads)
  ok, status = step_status(loss, grad_norm)
  new = state.apply_gradients(grads=grads, **changes)
  return keep_if(ok, new, state).replace(step=new.step), status, grad_norm
