"""Gradient descent on small in-memory arrays: batch, mini-batch, stochastic.

The course notes' three forms differ only in how many examples each update
sees: all of them (batch), `batch_size` of them (mini-batch) or one
(stochastic). `gradient_descent` runs any of them as a single `lax.scan`, so a
tiny network like the notes' XOR nets trains thousands of steps in one call.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax


def gradient_descent(model, params, x, y, loss_fn: Callable, tx: optax.GradientTransformation,
                     steps: int, *, batch_size: Optional[int] = None, rng=None):
  """Trains `params` of `model` on (x, y) and returns (params, losses per step).

  Arguments:
    model: a Flax module whose apply returns (outputs, features) or outputs.
    params: its initial 'params' collection.
    x: inputs (N, ...); y: targets (N, ...).
    loss_fn: (outputs, targets) -> per-example losses (N,).
    tx: an Optax optimizer (e.g. optax.sgd(1.0) for plain gradient descent).
    steps: number of updates.
    batch_size: None for batch gradient descent (every update sees all N
      examples), 1 for stochastic, anything between for mini-batch. Mini-batches
      are drawn uniformly without replacement from a fresh permutation per step.
    rng: key for drawing mini-batches (needed unless batch_size is None).
  Returns:
    (trained params, losses (steps,) -- the mean loss of each update's batch).
  """
  num_examples = x.shape[0]
  if batch_size is not None and rng is None:
    raise ValueError("mini-batch and stochastic gradient descent need an rng")

  def outputs(p, inputs):
    out = model.apply({"params": p}, inputs)
    return out[0] if isinstance(out, tuple) else out

  def step(carry, step_index):
    p, opt_state = carry
    if batch_size is None:
      xb, yb = x, y
    else:
      idx = jax.random.permutation(jax.random.fold_in(rng, step_index), num_examples)[:batch_size]
      xb, yb = x[idx], y[idx]
    loss, grads = jax.value_and_grad(lambda q: loss_fn(outputs(q, xb), yb).mean())(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  @jax.jit
  def run(p):
    (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(steps))
    return p, losses

  return run(params)
