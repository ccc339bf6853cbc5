"""Multilayer perceptron on flattened images.

The default sizes (1000, 512) follow the Keras CIFAR-10 MLP of the course notes:
Flatten -> Dense(1000, relu) -> Dropout(0.2) -> Dense(512, relu) -> Dropout(0.2)
-> Dense(10). On 32x32x3 inputs: 3,073,000 + 512,512 + 5,130 = 3,590,642 params.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdl import activations
from jdl.models import layers


class MLP(nn.Module):
  """Flatten, then `hidden_sizes` Dense layers with dropout, then a Dense head.

  Arguments:
    hidden_sizes: width of each hidden layer, input side first.
    num_classes: number of logits.
    activation: hidden activation name (see `jdl.activations`).
    dropout: dropout rate after every hidden layer.
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
  """
  hidden_sizes: Sequence[int] = (1000, 512)
  num_classes: int = 10
  activation: str = 'relu'
  dropout: float = 0.2
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    Arguments:
      x: (B, ...) inputs, e.g. (B, H, W, C) images; everything after B is flattened.
      train: enables dropout (needs the 'dropout' rng).
    """
    act = activations.get(self.activation)
    features = {}
    x = layers.Flatten(name='flatten')(x)  # (B, H*W*C)
    for i, size in enumerate(self.hidden_sizes):
      x = nn.Dense(size, dtype=self.dtype, name=f'dense{i + 1}')(x)
      x = act(x)
      x = nn.Dropout(self.dropout, deterministic=not train, name=f'dropout{i + 1}')(x)
      features[f'dense{i + 1}'] = x
      if self.cut_at == f'dense{i + 1}':
        return None, features
    features['pre_logits'] = x
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32), features
