"""GoogLeNet (Szegedy et al. 2015, Inception v1), torchvision's, and a small-input stem.

stem='imagenet' is torchvision's `googlenet` layer for layer: 6,624,904 params at
224x224x3 and 1,000 classes, 13,004,888 with the two auxiliary heads:

    conv1 7x7/2 (64) -> maxpool1 3/2 -> conv2 1x1 (64) -> conv3 3x3 (192) -> maxpool2 3/2
    -> inception3a, 3b -> maxpool3 3/2 -> inception4a [aux1] 4b 4c 4d [aux2] 4e
    -> maxpool4 2/2 -> inception5a, 5b -> avgpool -> dropout(0.2) -> fc
    # sides at 224: 112, 56, 56, 28 | 28 | 14 | 7 | 1

Every conv is torchvision's BasicConv2d: conv without bias, BatchNorm (eps
0.001), ReLU. Max pools round up (torch's ceil_mode=True). An Inception module
concatenates four branches: a 1x1 conv; a 1x1 reduce then a 3x3; a 1x1 reduce
then the "5x5" (a 3x3 in torchvision, a known slip that its weights keep, so
`branch3_kernel=3` by default; 5 gives the paper's 5x5); a 3x3 stride-1 max
pool then a 1x1. The imagenet stem takes inputs of at least 15x15 (32x32 ends
at 1x1). stem='cifar' (the default, for 28x28 and 32x32) replaces conv1 by a
3x3 stride-1 conv and drops maxpool1: 32 -> 32, 16, 8, 4 and 28 -> 28, 14, 7, 4;
every other layer and name is the same (5,602,474 params on 32x32x3 at 10
classes).

Auxiliary heads (`aux_logits=True`, off by default) follow torchvision's
InceptionAux: adaptive 4x4 average pool, BasicConv2d 1x1 (128), Flatten, Dense
(1024), ReLU, Dropout(0.7), Dense(num_classes). Their variables exist whatever
the mode (they count, and load); their logits are computed and returned in
`features` ('aux1_logits', 'aux2_logits') in train mode only, as torchvision
returns them only when training. Combining their losses (torchvision's 0.3
weight) is the loss's business, not the model's.

Names map torchvision's with '_' for '.': 'inception4b.branch2.1.conv.weight'
<-> params/inception4b/branch2_1/conv/kernel, 'conv1.bn.running_var' <->
batch_stats/conv1/bn/var, 'aux1.fc1.weight' <-> params/aux1/fc1/kernel (whose
(C, H, W)-ordered input rows `jdl.pretrained` permutes), 'fc.bias' <-> params/fc/bias.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdl import activations
from jdl.errors import ConfigError
from jdl.models import layers
from jdl.models.alexnet import AdaptiveAvgPool

STEMS = ('cifar', 'imagenet')
# torchvision's Inception arguments at width 64: (ch1x1, ch3x3red, ch3x3, ch5x5red,
# ch5x5, pool_proj); each module outputs ch1x1 + ch3x3 + ch5x5 + pool_proj channels.
INCEPTION = {
    '3a': (64, 96, 128, 16, 32, 32),  # -> 256
    '3b': (128, 128, 192, 32, 96, 64),  # -> 480
    '4a': (192, 96, 208, 16, 48, 64),  # -> 512, aux1 reads it
    '4b': (160, 112, 224, 24, 64, 64),  # -> 512
    '4c': (128, 128, 256, 24, 64, 64),  # -> 512
    '4d': (112, 144, 288, 32, 64, 64),  # -> 528, aux2 reads it
    '4e': (256, 160, 320, 32, 128, 128),  # -> 832
    '5a': (256, 160, 320, 32, 128, 128),  # -> 832
    '5b': (384, 192, 384, 48, 128, 128),  # -> 1024
}
STAGE_SIZES = (2, 5, 2)  # Inception modules in stages 3, 4 and 5 (3a-3b, 4a-4e, 5a-5b)
# ImageNet statistics, for torchvision's transform_input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _ceil_pool_side(side: int, window: int, stride: int) -> int:
  """Output side of torch's MaxPool2d(window, stride, ceil_mode=True); 0: too small."""
  out = -(-(side - window) // stride) + 1
  if (out - 1) * stride >= side:  # torch: the last window must start inside the input
    out -= 1
  return max(out, 0)


def feature_side(side: int, stem: str) -> int:
  """Side of maxpool4's output (inception5's maps) for inputs of this side; 0: too small."""
  if stem == 'imagenet':
    side = _ceil_pool_side((side - 1) // 2 + 1, 3, 2)  # conv1 7x7/2 pad 3, maxpool1
  for window, stride in ((3, 2), (3, 2), (2, 2)):  # maxpool2, 3, 4
    side = _ceil_pool_side(side, window, stride) if side else 0
  return side


def min_input_side(stem: str) -> int:
  """The smallest input side the stem takes (15 for 'imagenet', 4 for 'cifar')."""
  return next(side for side in range(1, 1024) if feature_side(side, stem) > 0)


def ceil_pool(max_pool, x, window: int, stride: int, name: str):
  """max_pool(window, stride) rounding the output side up, as torch's ceil_mode=True:
  the bottom and right get the -inf padding that the last window needs."""
  pads = []
  for side in x.shape[1:3]:
    out = _ceil_pool_side(side, window, stride)
    pads.append((0, max(0, (out - 1) * stride + window - side)))
  padding = 'VALID' if pads == [(0, 0), (0, 0)] else tuple(pads)
  return max_pool(window, stride, padding, name=name)(x)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps 0.001) -> activation.

  Arguments:
    features: output channels.
    kernel_size: square kernel side.
    strides: stride.
    padding: torch-style padding, pixels on every side.
    activation: activation name.
    dtype: compute dtype.
    conv: the convolution module (see `GoogLeNet`).
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  padding: int = 0
  activation: str = 'relu'
  dtype: Any = jnp.float32
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = False):  # (B, H, W, Cin) -> (B, H', W', features)
    k, s, p = self.kernel_size, self.strides, self.padding
    x = self.conv(self.features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                  use_bias=False, dtype=self.dtype, name='conv')(x)
    # momentum 0.9 here is torch's momentum=0.1 (Flax keeps 0.9 of the old value).
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                     dtype=self.dtype, name='bn')(x)
    return activations.get(self.activation)(x)


class Inception(nn.Module):
  """Four parallel branches concatenated on channels (torchvision's Inception).

  Arguments:
    channels: (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), as torchvision.
    branch3_kernel: kernel side of branch3's second conv: 3 as torchvision, 5 as the paper.
    activation: activation name.
    dtype: compute dtype.
    conv: the convolution module.
    max_pool: the max pool module.
  """
  channels: Sequence[int]
  branch3_kernel: int = 3
  activation: str = 'relu'
  dtype: Any = jnp.float32
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  @nn.compact
  def __call__(self, x, train: bool = False):  # (B, H, W, Cin) -> (B, H, W, sum of 4 branches)
    ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = self.channels
    basic = functools.partial(BasicConv2d, activation=self.activation, dtype=self.dtype,
                              conv=self.conv)
    k = self.branch3_kernel
    branch1 = basic(ch1x1, name='branch1')(x, train)
    branch2 = basic(ch3x3red, name='branch2_0')(x, train)
    branch2 = basic(ch3x3, 3, padding=1, name='branch2_1')(branch2, train)
    branch3 = basic(ch5x5red, name='branch3_0')(x, train)
    branch3 = basic(ch5x5, k, padding=k // 2, name='branch3_1')(branch3, train)
    branch4 = self.max_pool(3, 1, ((1, 1), (1, 1)), name='branch4_0')(x)  # keeps H, W
    branch4 = basic(pool_proj, name='branch4_1')(branch4, train)
    return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class InceptionAux(nn.Module):
  """An auxiliary classifier (torchvision's InceptionAux).

  Arguments:
    num_classes: number of logits.
    width: base width (see `GoogLeNet`); 64 gives 128 conv channels and 1024 Dense units.
    dropout: rate before the last Dense (torchvision 0.7).
    activation: activation name.
    dtype: compute dtype.
    conv: the convolution module.
  """
  num_classes: int
  width: int = 64
  dropout: float = 0.7
  activation: str = 'relu'
  dtype: Any = jnp.float32
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = False):  # (B, H, W, C) -> (B, num_classes) float32
    scale = lambda channels: max(1, channels * self.width // 64)
    x = AdaptiveAvgPool(4, name='avgpool')(x)  # (B, 4, 4, C)
    x = BasicConv2d(scale(128), activation=self.activation, dtype=self.dtype, conv=self.conv,
                    name='conv')(x, train)
    x = layers.Flatten(name='flatten')(x)  # (B, 16 * 128), (H, W, C) order
    x = nn.Dense(scale(1024), dtype=self.dtype, name='fc1')(x)
    x = activations.get(self.activation)(x)
    x = nn.Dropout(self.dropout, deterministic=not train, name='dropout')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc2')(x).astype(jnp.float32)


class GoogLeNet(nn.Module):
  """GoogLeNet (Inception v1): a conv stem, nine Inception modules, global average
  pool, dropout and a Dense 'fc'; optional auxiliary classifiers.

  Arguments:
    stem: 'imagenet' (torchvision's, inputs >= 15x15) or 'cifar' (3x3 stride-1
      conv1 and no maxpool1, for 28x28 and 32x32; see the module docstring).
    width: base width; every channel count scales by width / 64 (64: torchvision's).
    stage_sizes: Inception modules kept in stages 3, 4 and 5, the first ones of
      each: (2, 5, 2) is the whole net; fewer make a shallower one (the
      tests' (1, 1, 1) compiles much faster), whose features and heads
      are those of the modules kept (no aux2 without 4d; 5a's 832 channels
      before fc without 5b).
    aux_logits: add the two auxiliary classifiers (after inception4a and 4d).
    branch3_kernel: the "5x5" branch's kernel side: 3 (torchvision, whose
      weights load) or 5 (the paper).
    transform_input: rescale ImageNet-normalised RGB inputs to the (x - 0.5) /
      0.5 range torchvision's pretrained GoogLeNet was trained on, as its
      transform_input=True (what `googlenet(weights=...)` sets) does.
    dropout: rate before fc (torchvision 0.2).
    aux_dropout: rate inside the auxiliary heads (torchvision 0.7).
    num_classes: number of logits.
    activation: activation name after every BatchNorm and in the auxiliary heads.
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
    conv, max_pool: the convolution and max-pooling layers, built as
      conv(features, (k, k), strides=..., padding=..., use_bias=False, dtype=...,
      name=...) and max_pool(window, strides, padding, name=...): `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's); the Inception modules and heads get the same ones.
  """
  stem: str = 'cifar'
  width: int = 64
  stage_sizes: Sequence[int] = STAGE_SIZES
  aux_logits: bool = False
  branch3_kernel: int = 3
  transform_input: bool = False
  dropout: float = 0.2
  aux_dropout: float = 0.7
  num_classes: int = 10
  activation: str = 'relu'
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  def __post_init__(self):
    if self.stem not in STEMS:
      raise ConfigError(f'googlenet stem must be one of {list(STEMS)}, got {self.stem!r}')
    if self.width < 1:
      raise ConfigError(f'googlenet width must be >= 1, got {self.width}')
    if (len(self.stage_sizes) != 3
        or not all(1 <= n <= most for n, most in zip(self.stage_sizes, STAGE_SIZES))):
      raise ConfigError(f'googlenet stage_sizes must be 3 counts from (1, 1, 1) to {STAGE_SIZES}, '
                        f'got {tuple(self.stage_sizes)}')
    if self.branch3_kernel not in (3, 5):
      raise ConfigError(f'googlenet branch3_kernel must be 3 or 5, got {self.branch3_kernel}')
    super().__post_init__()

  def _check_input(self, shape: Sequence[int]) -> None:
    least = min_input_side(self.stem)
    if len(shape) != 4 or min(shape[1:3]) < least:
      size = 'x'.join(map(str, shape[1:]))
      raise ConfigError(f'googlenet (stem={self.stem!r}) cannot take {size} inputs: it needs '
                        f'(B, H, W, C) images of at least {least}x{least}')
    if self.transform_input and shape[-1] != 3:
      raise ConfigError(f'googlenet transform_input needs RGB inputs, got {shape[-1]} channels')

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    features: 'stem' (maxpool2's output, (B, 28, 28, 192) at 224), then each
    Inception module's output ('inception3a' ... 'inception5b'), 'pre_logits'
    (B, 1024 * width / 64); with aux_logits and train, 'aux1_logits' and
    'aux2_logits' (B, num_classes) float32.

    Arguments:
      x: (B, H, W, C) images.
      train: BatchNorm uses and updates batch statistics (mutable 'batch_stats');
        dropout is active (needs the 'dropout' rng).

    Raises:
      ConfigError: inputs too small for the stem (one line, with the shape).
    """
    self._check_input(x.shape)
    scale = lambda channels: max(1, channels * self.width // 64)
    basic = functools.partial(BasicConv2d, activation=self.activation, dtype=self.dtype,
                              conv=self.conv)
    features = {}

    if self.transform_input:
      # torchvision's: x * std / 0.5 + (mean - 0.5) / 0.5 per channel.
      std, mean = (jnp.asarray(v, jnp.float32).reshape(1, 1, 1, 3)
                   for v in (IMAGENET_STD, IMAGENET_MEAN))
      x = x * (std / 0.5) + (mean - 0.5) / 0.5

    # Stem.
    if self.stem == 'imagenet':
      x = basic(scale(64), 7, strides=2, padding=3, name='conv1')(x, train)  # (B, H/2, W/2, 64)
      x = ceil_pool(self.max_pool, x, 3, 2, 'maxpool1')  # (B, H/4, W/4, 64)
    else:
      x = basic(scale(64), 3, padding=1, name='conv1')(x, train)  # (B, H, W, 64)
    x = basic(scale(64), 1, name='conv2')(x, train)
    x = basic(scale(192), 3, padding=1, name='conv3')(x, train)
    x = ceil_pool(self.max_pool, x, 3, 2, 'maxpool2')  # (B, 28, 28, 192) at 224
    features['stem'] = x
    if self.cut_at == 'stem':
      return None, features

    # Inception modules; the auxiliary heads read 4a and 4d.
    aux = self.aux_logits and (train or self.is_initializing())  # variables exist in any mode
    for key, channels in INCEPTION.items():
      if 'abcde'.index(key[1]) >= self.stage_sizes[int(key[0]) - 3]:
        continue  # a shallower net (stage_sizes)
      if key in ('4a', '5a'):
        x = ceil_pool(self.max_pool, x, 3 if key == '4a' else 2, 2,
                      'maxpool3' if key == '4a' else 'maxpool4')
      x = Inception(tuple(map(scale, channels)), branch3_kernel=self.branch3_kernel,
                    activation=self.activation, dtype=self.dtype, conv=self.conv,
                    max_pool=self.max_pool, name=f'inception{key}')(x, train)
      features[f'inception{key}'] = x
      if self.cut_at == f'inception{key}':
        return None, features
      if aux and key in ('4a', '4d'):
        head = 'aux1' if key == '4a' else 'aux2'
        aux_out = InceptionAux(self.num_classes, width=self.width, dropout=self.aux_dropout,
                               activation=self.activation, dtype=self.dtype, conv=self.conv,
                               name=head)(x, train)
        if train:
          features[f'{head}_logits'] = aux_out

    # Head.
    x = layers.GlobalAvgPool(name='avgpool')(x)  # (B, 1024)
    x = nn.Dropout(self.dropout, deterministic=not train, name='dropout')(x)
    features['pre_logits'] = x
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return logits.astype(jnp.float32), features
