"""The fast max pool equals nn.max_pool in outputs and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl.models import layers


@pytest.mark.parametrize("shape,window", [((3, 8, 8, 4), (2, 2)), ((2, 9, 7, 3), (2, 2)),
                                          ((2, 12, 12, 2), (3, 3)), ((2, 8, 6, 1), (2, 3))])
def test_tiled_max_pool_matches_reference(shape, window):
  x = jax.random.normal(jax.random.key(0), shape)  # Continuous values: no ties.
  reference = lambda x: nn.max_pool(x, window, window, "VALID")
  fast = lambda x: layers.MaxPool(window).apply({}, x)
  np.testing.assert_array_equal(fast(x), reference(x))
  weights = jax.random.normal(jax.random.key(1), reference(x).shape)
  grad = lambda f: jax.grad(lambda x: (f(x) * weights).sum())(x)
  np.testing.assert_array_equal(grad(fast), grad(reference))


def test_overlapping_and_padded_pools_use_reference():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  pool = layers.MaxPool(3, strides=2, padding=((1, 1), (1, 1)))
  expected = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf),
                         (3, 3), (2, 2), "VALID")
  np.testing.assert_array_equal(pool.apply({}, x), expected)
