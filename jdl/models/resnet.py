"""ResNets (He et al. 2016) with BatchNorm, CIFAR and torchvision layouts.

One `ResNet` module; variants are partials (Flax examples style):
  * ResNet20: the paper's CIFAR net, 3 stages (16, 32, 64) x 3 BasicBlocks,
    with 1x1 conv + BN projection shortcuts where the shape changes (option B).
  * ResNet18/34/50: torchvision stage layouts. With stem='cifar' (3x3 stride-1
    conv, no max pool: the kuangliu CIFAR variant) ResNet18 has 11,173,962
    params for 10 classes; with stem='imagenet' and 1000 classes it is exactly
    torchvision's resnet18 (11,689,512 params).

Parameters are named after torchvision so loading its weights is mechanical:
torch 'layer1.0.conv1.weight' -> params['layer1_0']['conv1']['kernel'] (OIHW ->
HWIO), 'layer2.0.downsample.0' / '.1' -> 'layer2_0/downsample_conv' /
'downsample_bn', 'bn1.running_mean' -> batch_stats['bn1']['mean'], 'fc.weight'
-> params['fc']['kernel'] (transposed). Convs have no bias (BN follows) and use
explicit torch-style padding, because 'SAME' with stride 2 pads (0, 1) where
torch pads (1, 1) and the two would read different pixels.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdl import activations
from jdl.errors import ConfigError
from jdl.models import layers

# torchvision's conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(conv, features, kernel, strides, dtype, name):
  """Bias-free `conv` layer (kernel x kernel) with torch padding k // 2 on every side."""
  pad = kernel // 2
  return conv(features, (kernel, kernel), strides=(strides, strides),
              padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
              kernel_init=conv_init, name=name)


def _bn(train, dtype, name):
  # momentum 0.9 here is torch's momentum=0.1 (Flax keeps 0.9 of the old value).
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs with BN and an identity or 1x1-projection shortcut.

  Arguments:
    filters: output channels.
    strides: stride of the first conv and of the projection.
    activation: activation name.
    dtype: compute dtype.
    conv: the convolution layer (`nn.Conv` or a stand-in with its fields).
  """
  filters: int
  strides: int = 1
  activation: str = 'relu'
  dtype: Any = jnp.float32
  conv: Any = nn.Conv
  expansion = 1  # output channels / filters (a class constant, not a field)

  @nn.compact
  def __call__(self, x, train: bool = False):  # (B, H, W, Cin) -> (B, H/s, W/s, filters)
    act = activations.get(self.activation)
    y = _conv(self.conv, self.filters, 3, self.strides, self.dtype, 'conv1')(x)
    y = act(_bn(train, self.dtype, 'bn1')(y))
    y = _conv(self.conv, self.filters, 3, 1, self.dtype, 'conv2')(y)
    y = _bn(train, self.dtype, 'bn2')(y)
    return act(y + _shortcut(self.conv, x, self.filters, self.strides, train, self.dtype))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, as torchvision "v1.5"), 1x1 expand to 4x filters.

  Arguments:
    filters: bottleneck channels; the block outputs 4 * filters.
    strides: stride of the 3x3 conv and of the projection.
    activation: activation name.
    dtype: compute dtype.
    conv: the convolution layer (`nn.Conv` or a stand-in with its fields).
  """
  filters: int
  strides: int = 1
  activation: str = 'relu'
  dtype: Any = jnp.float32
  conv: Any = nn.Conv
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):  # -> (B, H/s, W/s, 4 * filters)
    act = activations.get(self.activation)
    conv = self.conv
    y = act(_bn(train, self.dtype, 'bn1')(_conv(conv, self.filters, 1, 1, self.dtype, 'conv1')(x)))
    y = _conv(conv, self.filters, 3, self.strides, self.dtype, 'conv2')(y)
    y = act(_bn(train, self.dtype, 'bn2')(y))
    y = _conv(conv, self.filters * 4, 1, 1, self.dtype, 'conv3')(y)
    y = _bn(train, self.dtype, 'bn3')(y)
    return act(y + _shortcut(conv, x, self.filters * 4, self.strides, train, self.dtype))


def _shortcut(conv, x, out_channels, strides, train, dtype):
  """Identity, or 1x1 conv + BN when the shape changes (called inside a block)."""
  if strides == 1 and x.shape[-1] == out_channels:
    return x
  x = _conv(conv, out_channels, 1, strides, dtype, 'downsample_conv')(x)
  return _bn(train, dtype, 'downsample_bn')(x)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}
STEMS = ('cifar', 'imagenet')


class ResNet(nn.Module):
  """ResNet: stem, stages of residual blocks, global average pool, Dense 'fc'.

  Stage i has stage_sizes[i] blocks of widths[i] filters; every stage but the
  first halves H and W in its first block. The stem has widths[0] channels.

  Arguments:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet18.
    widths: filters per stage, e.g. (64, 128, 256, 512).
    block: 'basic' (two 3x3) or 'bottleneck' (1x1-3x3-1x1, 4x expansion).
    stem: 'cifar' (3x3 stride-1 conv + BN + act) or 'imagenet' (7x7 stride-2
      conv + BN + act + 3x3 stride-2 max pool, torchvision padding 3 / 1).
    num_classes: number of logits.
    activation: activation name.
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
    conv, max_pool: the convolution and max-pooling layers: `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's).
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block: str = 'basic'
  stem: str = 'cifar'
  num_classes: int = 10
  activation: str = 'relu'
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  def __post_init__(self):
    if self.block not in BLOCKS:
      raise ConfigError(f'resnet block must be one of {sorted(BLOCKS)}, got {self.block!r}')
    if self.stem not in STEMS:
      raise ConfigError(f'resnet stem must be one of {list(STEMS)}, got {self.stem!r}')
    if len(self.stage_sizes) != len(self.widths):
      raise ConfigError(f'resnet stage_sizes {tuple(self.stage_sizes)} and widths '
                        f'{tuple(self.widths)} differ in length')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    features: 'stem', 'layer1'.. (output of each stage) and 'pre_logits' (B, C).

    Arguments:
      x: (B, H, W, C) images.
      train: BatchNorm uses and updates batch statistics (mutable 'batch_stats').
    """
    act = activations.get(self.activation)
    block_cls = functools.partial(BLOCKS[self.block], activation=self.activation,
                                  dtype=self.dtype, conv=self.conv)
    features = {}

    # Stem.
    if self.stem == 'cifar':
      x = _conv(self.conv, self.widths[0], 3, 1, self.dtype, 'conv1')(x)  # (B, H, W, w0)
      x = act(_bn(train, self.dtype, 'bn1')(x))
    else:
      x = _conv(self.conv, self.widths[0], 7, 2, self.dtype, 'conv1')(x)  # (B, H/2, W/2, w0)
      x = act(_bn(train, self.dtype, 'bn1')(x))
      x = self.max_pool(3, 2, ((1, 1), (1, 1)), name='maxpool')(x)  # (B, H/4, W/4, w0)
    features['stem'] = x
    if self.cut_at == 'stem':
      return None, features

    # Stages: blocks are named torchvision-style 'layer{stage}_{block}'.
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(width, strides, name=f'layer{i + 1}_{j}')(x, train)
      features[f'layer{i + 1}'] = x
      if self.cut_at == f'layer{i + 1}':
        return None, features

    # Head.
    x = layers.GlobalAvgPool(name='avgpool')(x)  # (B, C)
    features['pre_logits'] = x
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return logits.astype(jnp.float32), features


ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64))
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512))
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512),
                             block='bottleneck')
