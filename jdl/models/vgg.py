"""CIFAR VGG (Simonyan & Zisserman 2015), as in the common CIFAR-10 repositories.

3x3 SAME convs (+ BatchNorm) + activation, five 2x2 max pools, global average
pool, dropout and one Dense head. On 32x32 inputs the last pool leaves 1x1, so
the global pool equals the usual Flatten; it also keeps larger inputs working.
A pool over an odd side keeps the last row/column (torch's ceil_mode), so 28x28
inputs (the MNISTs) go 14, 7, 4, 2, 1 instead of reaching 0x0; even sides pool
exactly as before.
Convs keep their bias even before BatchNorm, as torchvision's `vgg*_bn` and the
kuangliu CIFAR VGG do, so parameter counts and weights line up with those.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jdl import activations
from jdl.errors import ConfigError
from jdl.models import layers

# Output channels at base width 64; 'M' is a 2x2 max pool that ends a block.
CONFIGS = {
    11: (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    13: (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    16: (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
         512, 512, 512, 'M'),
    19: (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M',
         512, 512, 512, 512, 'M'),
}


class VGG(nn.Module):
  """VGG-`depth` for small images.

  Arguments:
    depth: 11, 13, 16 or 19 (weight layers, the head included).
    width: base width; channels scale by width / 64 (width 8 gives 8..64).
    batch_norm: BatchNorm after every conv (momentum 0.9 = torch's 0.1).
    dropout: rate before the head.
    num_classes: number of logits.
    activation: activation name after every conv (BatchNorm).
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
    conv, max_pool: the convolution and max-pooling layers: `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's).
  """
  depth: int = 11
  width: int = 64
  batch_norm: bool = True
  dropout: float = 0.0
  num_classes: int = 10
  activation: str = 'relu'
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  def __post_init__(self):
    if self.depth not in CONFIGS:
      raise ConfigError(
          f'vgg depth must be one of {sorted(CONFIGS)}, got {self.depth!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    Arguments:
      x: (B, H, W, C) images, any H, W >= 1 (five halvings, rounded up).
      train: BatchNorm uses and updates batch statistics (mutable 'batch_stats');
        dropout is active (needs the 'dropout' rng).
    """
    act = activations.get(self.activation)
    features = {}
    conv_i, block_i = 0, 0
    for item in CONFIGS[self.depth]:
      if item == 'M':
        block_i += 1
        # Halves H and W, rounding up: an odd side gets one -inf padded row/column.
        pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
        x = self.max_pool(2, padding=pad if pad != ((0, 0), (0, 0)) else 'VALID',
                          name=f'pool{block_i}')(x)
        features[f'block{block_i}'] = x
        if self.cut_at == f'block{block_i}':
          return None, features
        continue
      conv_i += 1
      x = self.conv(item * self.width // 64, (3, 3), padding='SAME', dtype=self.dtype,
                    name=f'conv{conv_i}')(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name=f'bn{conv_i}')(x)
      x = act(x)
    x = layers.GlobalAvgPool(name='avgpool')(x)  # (B, 8 * width)
    x = nn.Dropout(self.dropout, deterministic=not train, name='dropout')(x)
    features['pre_logits'] = x
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32), features
