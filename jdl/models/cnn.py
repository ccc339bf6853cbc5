"""Small convolutional nets: the course's CIFAR-10 CNN and LeNet-5.

`CNN` is the Keras CIFAR-10 CNN of the course notes, layer for layer:

    Conv2D(16, 2, padding='same', activation='relu') -> MaxPooling2D(2)
    Conv2D(32, 2, padding='same', activation='relu') -> MaxPooling2D(2)
    Conv2D(64, 2, padding='same', activation='relu') -> MaxPooling2D(2)
    Dropout(0.3) -> Flatten -> Dense(500, relu) -> Dropout(0.4) -> Dense(10)

On 32x32x3 inputs: 208 + 2,080 + 8,256 + 512,500 + 5,010 = 528,054 parameters,
the figure Keras' model.summary() prints.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdl import activations
from jdl.errors import ConfigError
from jdl.models import layers


class CNN(nn.Module):
  """Conv -> MaxPool blocks, dropout, one hidden Dense layer, Dense head.

  Arguments:
    filters: output channels of each conv block.
    kernel_size: square conv kernel side (SAME padding, stride 1).
    dense_size: width of the hidden Dense layer.
    num_classes: number of logits.
    activation: activation name for convs and the hidden Dense.
    dropout: rate after the last conv block.
    head_dropout: rate before the output Dense.
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
    conv, max_pool: the convolution and max-pooling layers: `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's).
  """
  filters: Sequence[int] = (16, 32, 64)
  kernel_size: int = 2
  dense_size: int = 500
  num_classes: int = 10
  activation: str = 'relu'
  dropout: float = 0.3
  head_dropout: float = 0.4
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    Arguments:
      x: (B, H, W, C) images; H and W must survive len(filters) halvings.
      train: enables dropout (needs the 'dropout' rng).
    """
    act = activations.get(self.activation)
    k = self.kernel_size
    features = {}
    for i, width in enumerate(self.filters):
      x = self.conv(width, (k, k), padding='SAME', dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = act(x)
      x = self.max_pool(2, name=f'pool{i + 1}')(x)  # (B, H/2, W/2, width)
      features[f'block{i + 1}'] = x
      if self.cut_at == f'block{i + 1}':
        return None, features
    x = nn.Dropout(self.dropout, deterministic=not train, name='dropout1')(x)
    x = layers.Flatten(name='flatten')(x)
    x = nn.Dense(self.dense_size, dtype=self.dtype, name='dense1')(x)
    x = act(x)
    x = nn.Dropout(self.head_dropout, deterministic=not train, name='dropout2')(x)
    features['pre_logits'] = x  # (B, dense_size)
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32), features


class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al. 1998) with a modern activation and pooling choice.

  Conv(6, 5x5, VALID) -> pool -> Conv(16, 5x5, VALID) -> pool -> Flatten
  -> Dense(120) -> Dense(84) -> Dense(num_classes). On 32x32x3: 62,006 params.

  Arguments:
    num_classes: number of logits.
    activation: activation name after every conv and hidden Dense.
    pool: 'max' or 'avg' (the 1998 paper used average-like subsampling).
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
    conv, max_pool: the convolution and max-pooling layers: `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's).
  """
  num_classes: int = 10
  activation: str = 'relu'
  pool: str = 'max'
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  def __post_init__(self):
    if self.pool not in ('max', 'avg'):
      raise ConfigError(f"lenet5 pool must be 'max' or 'avg', got {self.pool!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    Arguments:
      x: (B, H, W, C) images, H and W >= 16 (32x32 gives 5x5x16 before Flatten).
      train: unused (no dropout or BatchNorm); kept for the common signature.
    """
    del train
    act = activations.get(self.activation)
    pool = self.max_pool if self.pool == 'max' else layers.AvgPool
    features = {}
    x = act(self.conv(6, (5, 5), padding='VALID', dtype=self.dtype, name='conv1')(x))
    x = pool(2, name='pool1')(x)  # 32x32 -> 28x28 -> (B, 14, 14, 6)
    features['block1'] = x
    if self.cut_at == 'block1':
      return None, features
    x = act(self.conv(16, (5, 5), padding='VALID', dtype=self.dtype, name='conv2')(x))
    x = pool(2, name='pool2')(x)  # 14x14 -> 10x10 -> (B, 5, 5, 16)
    features['block2'] = x
    if self.cut_at == 'block2':
      return None, features
    x = layers.Flatten(name='flatten')(x)
    x = act(nn.Dense(120, dtype=self.dtype, name='dense1')(x))
    x = act(nn.Dense(84, dtype=self.dtype, name='dense2')(x))
    features['pre_logits'] = x  # (B, 84)
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32), features
