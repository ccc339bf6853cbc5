"""The notes' tiny NumPy networks (no hidden layer; 4 hidden sigmoid units).

The NumPy originals: inputs X with a constant third column (a bias input),
sigmoid units, squared error, full-batch gradient descent with step 1. Here the
same networks are jdl `MLP`s with sigmoid activations and a sigmoid output,
trained by `jdl.gd.gradient_descent`.
"""
import dataclasses
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
