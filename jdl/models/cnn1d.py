"""A 1-D CNN for sequence classification (`cnn1d`).

The default is the MNIST-1D paper's ConvBase: three Conv1D layers of 25
channels, kernels 5/3/3, stride 2, padding 1, ReLU, then a Dense head on the
flattened features. On MNIST-1D (length 40, 1 channel) the lengths go
40 -> 19 -> 10 -> 5 and the parameters are 150 + 1,900 + 1,900 + 1,260 = 5,210.
Output length of each layer: floor((T + 2 * padding - kernel) / stride) + 1.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdl import activations
from jdl.models import layers


class CNN1D(nn.Module):
  """Conv1D stack -> Flatten -> (Dropout) -> Dense head.

  Arguments:
    channels: output channels of each conv layer.
    kernel_sizes: kernel length of each conv layer (same length as channels).
    stride: stride of every conv layer.
    padding: zeros added at both ends of the sequence by every conv layer.
    num_classes: number of logits.
    activation: activation name after each conv.
    dropout: dropout rate before the head.
    dtype: compute dtype; parameters stay float32, logits come back float32.
  """
  channels: Sequence[int] = (25, 25, 25)
  kernel_sizes: Sequence[int] = (5, 3, 3)
  stride: int = 2
  padding: int = 1
  num_classes: int = 10
  activation: str = 'relu'
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    Arguments:
      x: (B, T, F) sequences, or (B, T) taken as F = 1.
      train: enables dropout.
    """
    if x.ndim == 2:
      x = x[..., None]  # (B, T, 1)
    act = activations.get(self.activation)
    features = {}
    for i, (width, kernel) in enumerate(zip(self.channels, self.kernel_sizes)):
      x = nn.Conv(width, (kernel,), strides=(self.stride,), padding=((self.padding, self.padding),),
                  dtype=self.dtype, name=f'conv{i + 1}')(x)  # (B, T', width)
      x = act(x)
      features[f'conv{i + 1}'] = x
    x = layers.Flatten(name='flatten')(x)  # (B, T' * width)
    x = nn.Dropout(self.dropout, deterministic=not train, name='dropout')(x)
    features['pre_logits'] = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32), features
