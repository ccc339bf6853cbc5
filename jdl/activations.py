"""Activation functions selectable by name.

The course notes' list: linear, sigmoid, tanh, ReLU, leaky ReLU, ELU, SELU,
softplus (plus GELU for fastnet), and softmax with a temperature T:
softmax(x / T) -- T < 1 sharpens the distribution, T > 1 flattens it.
Models keep the activation as a string field so the module stays hashable and
its config printable; `get(name)` turns it into a function.
"""
import jax
import jax.numpy as jnp

from jdl.registry import Registry

ACTIVATIONS = Registry("activation")


def linear(x):
  """Identity: f(x) = x."""
  return x


def leaky_relu(x, negative_slope: float = 0.01):
  """f(x) = x for x >= 0, negative_slope * x otherwise (Keras/PyTorch default 0.01)."""
  return jnp.where(x >= 0, x, negative_slope * x)


def softmax(x, temperature: float = 1.0, axis: int = -1):
  """softmax(x / temperature) along `axis`.

  Arguments:
    x: logits.
    temperature: > 0. Below 1 sharpens, above 1 flattens; 1 is the plain softmax.
    axis: the class axis.
  """
  return jax.nn.softmax(x / temperature, axis=axis)


ACTIVATIONS.register("linear", linear)
ACTIVATIONS.register("sigmoid", jax.nn.sigmoid)
ACTIVATIONS.register("tanh", jnp.tanh)
ACTIVATIONS.register("relu", jax.nn.relu)
ACTIVATIONS.register("leaky_relu", leaky_relu)
ACTIVATIONS.register("elu", jax.nn.elu)
ACTIVATIONS.register("selu", jax.nn.selu)
ACTIVATIONS.register("softplus", jax.nn.softplus)
# Exact (erf) GELU, as torch.nn.GELU() computes by default.
ACTIVATIONS.register("gelu", lambda x: jax.nn.gelu(x, approximate=False))
ACTIVATIONS.register("softmax", softmax)


def get(name: str):
  """Returns the activation function called `name` (ConfigError if unknown)."""
  return ACTIVATIONS.lookup(name)
