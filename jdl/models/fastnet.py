"""FastNet: the small CIFAR-10 net of the speed-record scripts (airbench94).

Keller Jordan's airbench94 reaches 94% CIFAR-10 test accuracy in a few seconds
of A100 time with this net (its training tricks -- patch-whitening init of the
stem, label smoothing, flip/translate augmentation, test-time flips, lookahead
-- belong to the training script, not the architecture):

    Conv(24, 2x2, VALID, bias) + GELU                 # 'whiten': 32x32 -> 31x31
    3 x ConvGroup(64, 256, 256):                       # 31 -> 15 -> 7 -> 3
      Conv3x3 -> MaxPool2 -> BN -> GELU -> Conv3x3 -> BN -> GELU
    global max pool -> Dense(num_classes, no bias) -> * 1/9

As in airbench, convs have no bias and BatchNorm learns only its shift (the
scale is fixed at 1), with eps 1e-12 and torch momentum 0.6, i.e. Flax
momentum 0.4: running stats move fast because a run is only ~10 epochs.
On 32x32x3 with 10 classes: 1,971,640 params.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdl import activations
from jdl.models import layers


class ConvGroup(nn.Module):
  """Conv -> MaxPool -> BN -> act -> Conv -> BN -> act; halves H and W.

  Arguments:
    width: output channels of both convs.
    activation: activation name.
    bn_momentum: Flax BatchNorm momentum (weight of the old running value).
    dtype: compute dtype.
    conv, max_pool: the convolution and max-pooling layers: `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's).
  """
  width: int
  activation: str = 'gelu'
  bn_momentum: float = 0.4
  dtype: Any = jnp.float32
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  @nn.compact
  def __call__(self, x, train: bool = False):  # (B, H, W, Cin) -> (B, H/2, W/2, width)
    act = activations.get(self.activation)
    bn = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-12,
        use_scale=False, dtype=self.dtype, name=name)
    x = self.conv(self.width, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype,
                  name='conv1')(x)
    x = self.max_pool(2, name='pool')(x)  # pooling before BN: 4x cheaper statistics
    x = act(bn('bn1')(x))
    x = self.conv(self.width, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype,
                  name='conv2')(x)
    return act(bn('bn2')(x))


class FastNet(nn.Module):
  """airbench94's net: whitening patch conv, three ConvGroups, scaled linear head.

  Arguments:
    widths: output channels of the three ConvGroups.
    whiten_width: channels of the 2x2 stem conv (airbench: 2 * 3 * 2 * 2 = 24,
      room for the +/- eigenvectors of the 12-dim patch covariance).
    num_classes: number of logits.
    activation: activation name (GELU in airbench).
    logit_scale: fixed factor on the logits (airbench: 1/9, a temperature that
      suits its learning rate).
    bn_momentum: Flax BatchNorm momentum (0.4 = torch momentum 0.6).
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
    conv, max_pool: the convolution and max-pooling layers: `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's).
  """
  widths: Sequence[int] = (64, 256, 256)
  whiten_width: int = 24
  num_classes: int = 10
  activation: str = 'gelu'
  logit_scale: float = 1 / 9
  bn_momentum: float = 0.4
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    Arguments:
      x: (B, H, W, C) images; 32x32 leaves 3x3 before the global max pool.
      train: BatchNorm uses and updates batch statistics (mutable 'batch_stats').
    """
    act = activations.get(self.activation)
    features = {}
    x = self.conv(self.whiten_width, (2, 2), padding='VALID', dtype=self.dtype,
                  name='whiten')(x)  # (B, H-1, W-1, whiten_width)
    x = act(x)
    features['stem'] = x
    if self.cut_at == 'stem':
      return None, features
    for i, width in enumerate(self.widths):
      x = ConvGroup(width, activation=self.activation, bn_momentum=self.bn_momentum,
                    dtype=self.dtype, conv=self.conv, max_pool=self.max_pool,
                    name=f'group{i + 1}')(x, train)
      features[f'group{i + 1}'] = x
      if self.cut_at == f'group{i + 1}':
        return None, features
    x = layers.GlobalMaxPool(name='maxpool')(x)  # (B, widths[-1])
    features['pre_logits'] = x
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32) * self.logit_scale, features
