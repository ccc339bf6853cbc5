"""The notes' tiny NumPy networks (no hidden layer; 4 hidden sigmoid units).

The NumPy originals: inputs X with a constant third column (a bias input),
sigmoid units, squared error, full-batch gradient descent with step 1. Here the
same networks are jdl `MLP`s with sigmoid activations and a sigmoid output,
trained by `jdl.gd.gradient_descent` (biases, Flax initialisation, mean loss).
`notes_network` runs instead the notes' two programs themselves, update for
update, in jax.numpy: the outputs they print, to every printed digit.
"""
import dataclasses
import functools
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdl.gd import gradient_descent
from jdl.models import MLP

# (4, 3): the two inputs plus a constant 1, as in the NumPy version.
INPUTS = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], np.float32)
TARGETS = {
    "first_input": np.array([[0], [0], [1], [1]], np.float32),  # Linearly separable.
    "xor": np.array([[0], [1], [1], [0]], np.float32),          # Not linearly separable.
}


@dataclasses.dataclass
class XorResult:
  name: str
  hidden_sizes: Tuple[int, ...]
  task: str
  outputs: np.ndarray   # (4,) network outputs after training, in (0, 1)
  targets: np.ndarray   # (4,)
  final_loss: float

  @property
  def solved(self) -> bool:
    """Every output on the right side of 0.5."""
    return bool(np.all((self.outputs > 0.5) == (self.targets > 0.5)))


def train_net(hidden_sizes, task: str, *, steps: int, learning_rate: float, seed: int) -> XorResult:
  """Trains one sigmoid MLP on one of TARGETS by full-batch gradient descent."""
  model = MLP(hidden_sizes=tuple(hidden_sizes), activation="sigmoid", num_classes=1, dropout=0.0)
  x, y = jnp.asarray(INPUTS), jnp.asarray(TARGETS[task])
  params = model.init(jax.random.key(seed), x)["params"]

  def loss_fn(logits, targets):  # Half squared error of the sigmoid output, per example.
    return 0.5 * jnp.sum((jax.nn.sigmoid(logits) - targets) ** 2, axis=-1)

  params, losses = gradient_descent(model, params, x, y, loss_fn, optax.sgd(learning_rate), steps)
  outputs = jax.nn.sigmoid(model.apply({"params": params}, x)[0])[:, 0]
  name = "no hidden layer" if not hidden_sizes else f"hidden layer of {hidden_sizes[0]} sigmoid units"
  return XorResult(name, tuple(hidden_sizes), task, np.asarray(outputs), TARGETS[task][:, 0],
                   float(losses[-1]))


def run_all(*, steps: int = 10_000, learning_rate: float = 1.0, seed: int = 1) -> List[XorResult]:
  """The notes' experiments: no hidden layer on both tasks, 4 hidden units on XOR."""
  return [train_net((), "first_input", steps=steps, learning_rate=learning_rate, seed=seed),
          train_net((), "xor", steps=steps, learning_rate=learning_rate, seed=seed),
          train_net((4,), "xor", steps=steps, learning_rate=learning_rate, seed=seed)]


def format_result(result: XorResult) -> str:
  rows = "\n".join(f"    {x[:2].astype(int).tolist()} -> {o:.3f}  (target {t:.0f})"
                   for x, o, t in zip(INPUTS, result.outputs, result.targets))
  verdict = "solved" if result.solved else "NOT solved"
  return (f"{result.name}, task {result.task}: {verdict}, final loss {result.final_loss:.4f}\n{rows}")


# ----------------------------------------------------------------------------
# The notes' NumPy programs, exactly (Andrew Trask, "A Neural Network in 11
# lines of Python"): no biases (the third input column is the bias), weights
# 2 * np.random.random(shape) - 1 after np.random.seed(1), sigmoid units, the
# update weights += layer_input.T @ (error * sigmoid'), i.e. plain gradient
# descent with step 1 on the summed half squared error. In float64 (as NumPy)
# every printed digit is NumPy's, the errors' 12 included; float32 gives the
# same printed outputs (tests/test_experiments.py).
# ----------------------------------------------------------------------------

# What the notes print after training (4 decimals, trailing zeros dropped).
NOTES_OUTPUTS = {"no_hidden": ".0097 .0079 .9936 .9921", "xor": ".0026 .9967 .997 .0039"}


def notes_weights(*shapes, seed: int = 1) -> List[np.ndarray]:
  """`np.random.seed(seed)` then `2 * np.random.random(shape) - 1` per shape, in
  order -- from a RandomState of its own (the same numbers), not the global one."""
  state = np.random.RandomState(seed)
  return [2 * state.random_sample(shape) - 1 for shape in shapes]


def _sigmoid(x):
  return 1 / (1 + jnp.exp(-x))


def _no_hidden_step(weights, x, y):
  """One iteration of the notes' first program; returns (weights, l1)."""
  (syn0,) = weights
  l1 = _sigmoid(x @ syn0)  # (4, 1)
  l1_delta = (y - l1) * (l1 * (1 - l1))  # error * sigmoid'(l1), sigmoid' from the output
  return (syn0 + x.T @ l1_delta,), l1


def _xor_step(weights, x, y):
  """One iteration of the notes' 3-4-1 program; returns (weights, l2)."""
  syn0, syn1 = weights
  l1 = _sigmoid(x @ syn0)  # (4, 4)
  l2 = _sigmoid(l1 @ syn1)  # (4, 1)
  l2_delta = (y - l2) * (l2 * (1 - l2))
  l1_delta = (l2_delta @ syn1.T) * (l1 * (1 - l1))
  return (syn0 + x.T @ l1_delta, syn1 + l1.T @ l2_delta), l2


@functools.partial(jax.jit, static_argnums=(0, 4))
def _iterate(step, weights, x, y, iterations: int):
  """`iterations` steps; returns the weights and the last iteration's output
  (computed before its update, as the notes print it)."""
  def body(_, carry):
    return step(carry[0], x, y)
  return jax.lax.fori_loop(0, iterations, body, (weights, jnp.zeros_like(y)))


def notes_network(task: str, iterations: int, hidden: int = 0, report_every: int = 10_000,
                  seed: int = 1, dtype=jnp.float32) -> Tuple[np.ndarray, List[Tuple[int, float]]]:
  """Runs one of the notes' programs.

  Arguments:
    task: 'first_input' (targets 0 0 1 1) or 'xor' (0 1 1 0).
    iterations: full-batch updates (the notes: 10,000 without a hidden layer,
      60,000 with).
    hidden: hidden sigmoid units (0: none, the weights are 3x1; 4: 3x4 and 4x1).
    report_every: the mean absolute error is recorded before iterations 0,
      report_every, ... (the notes' "Error:" lines).
    seed: np.random.seed of the weights.
    dtype: float32 (the printed outputs' digits all agree with NumPy's), or
      float64 under `jax.enable_x64` (NumPy's own precision).
  Returns:
    (outputs (4,) of the last iteration, [(iteration, mean |error|), ...]).
  """
  x, y = jnp.asarray(INPUTS, dtype), jnp.asarray(TARGETS[task], dtype)
  shapes = [(3, hidden), (hidden, 1)] if hidden else [(3, 1)]
  weights = tuple(jnp.asarray(w, dtype) for w in notes_weights(*shapes, seed=seed))
  step = _xor_step if hidden else _no_hidden_step
  errors, done, output = [], 0, None
  while done < iterations:
    _, first = step(weights, x, y)  # This iteration's output, as the loop computes it.
    errors.append((done, float(jnp.mean(jnp.abs(y - first)))))
    chunk = min(report_every, iterations - done)
    weights, output = _iterate(step, weights, x, y, chunk)
    done += chunk
  return np.asarray(output)[:, 0], errors


def notes_format(outputs) -> str:
  """Outputs as the notes print them: 4 decimals, no leading 0, no trailing zeros."""
  return " ".join(f"{o:.4f}".lstrip("0").rstrip("0").rstrip(".") or "0" for o in outputs)


def notes_report() -> str:
  """Both programs, printed beside the figures the notes print; in float64 as
  NumPy computes (float32 prints the same outputs)."""
  with jax.enable_x64(True):  # Scoped: this computation only.
    first, _ = notes_network("first_input", 10_000, dtype=jnp.float64)
    second, errors = notes_network("xor", 60_000, hidden=4, report_every=10_000, dtype=jnp.float64)
  lines = ["The notes' NumPy networks, exactly: weights 2*np.random.random(shape)-1 after "
           "np.random.seed(1), no biases, weights += input.T @ (error * sigmoid'), float64.",
           "No hidden layer (weights 3x1), targets [0 0 1 1], 10,000 iterations:",
           f"  output [{notes_format(first)}]  (notes: [{NOTES_OUTPUTS['no_hidden']}])",
           "One hidden layer (weights 3x4 and 4x1), XOR targets [0 1 1 0], 60,000 iterations, "
           "mean |target - output| every 10,000:"]
  lines += [f"  Error:{error:.12g}  (iteration {iteration:,})"  # Python 2's str(float), as printed
            for iteration, error in errors]
  lines.append(f"  output [{notes_format(second)}]  (notes: [{NOTES_OUTPUTS['xor']}])")
  return "\n".join(lines)
