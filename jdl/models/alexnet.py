"""AlexNet (Krizhevsky et al. 2012), torchvision's one-tower version, and a small-input variant.

stem='imagenet' is torchvision's `alexnet` layer for layer, 61,100,840 params at
224x224x3 and 1,000 classes:

    features: 0 Conv(64, 11x11, stride 4, pad 2)  1 ReLU  2 MaxPool(3, 2)
              3 Conv(192, 5x5, pad 2)             4 ReLU  5 MaxPool(3, 2)
              6 Conv(384, 3x3, pad 1) 7 ReLU  8 Conv(256, 3x3) 9 ReLU
              10 Conv(256, 3x3)      11 ReLU 12 MaxPool(3, 2)      # 224 -> 55, 27, 13, 6
    avgpool:  AdaptiveAvgPool(6x6)                                 # (B, 6, 6, 256)
    classifier: 0 Dropout(0.5) 1 Dense(4096) 2 ReLU 3 Dropout(0.5) 4 Dense(4096) 5 ReLU
                6 Dense(num_classes)

It needs inputs of at least 63x63 (smaller ones leave a pool less than its 3x3
window). stem='cifar' (the default, so `--model=alexnet` trains on 28x28x1 and
32x32x3) keeps every layer and name, and makes each stride-2 step halve the
side rounding up: features_0 is a 3x3 stride-2 conv (pad 1) instead of 11x11
stride 4, the three max pools pad by one -inf pixel, and the adaptive pool
gives 2x2, so 32 -> 16, 8, 4, 2 and 28 -> 14, 7, 4, 2 (23,468,874 params on
32x32x3 at 10 classes, 89% of them in the 4096-wide Dense layers).

Module names are torchvision's with '_' for '.': 'features.3.weight' <->
params/features_3/kernel (OIHW <-> HWIO), 'classifier.6.bias' <->
params/classifier_6/bias. torchvision flattens the pooled map in (C, H, W)
order, jdl in (H, W, C): `jdl.pretrained` permutes classifier.1's input rows.
"""
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jdl import activations
from jdl.errors import ConfigError
from jdl.models import layers

STEMS = ('cifar', 'imagenet')
# torchvision's `features`, index by index: ('conv', channels at width 64,
# kernel, stride, padding), ('act',) or ('pool',). stem='cifar' swaps in CIFAR_CONV0.
FEATURES = (
    ('conv', 64, 11, 4, 2), ('act',), ('pool',),
    ('conv', 192, 5, 1, 2), ('act',), ('pool',),
    ('conv', 384, 3, 1, 1), ('act',),
    ('conv', 256, 3, 1, 1), ('act',),
    ('conv', 256, 3, 1, 1), ('act',), ('pool',),
)
CIFAR_CONV0 = ('conv', 64, 3, 2, 1)
POOL_PADDING = {'imagenet': 0, 'cifar': 1}  # pixels per side of the 3x3 stride-2 pools
POOL_SIZE = {'imagenet': 6, 'cifar': 2}  # the adaptive pool's output side


def _pair(size) -> Tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _window_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's adaptive average pool along one axis:
  output i averages inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1."""
  weights = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start, end = i * n_in // n_out, -(-(i + 1) * n_in // n_out)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


class AdaptiveAvgPool(nn.Module):
  """torch's AdaptiveAvgPool2d: averages windows chosen so any (H, W) gives `size`.

  Windows that tile the input exactly (H and W multiples of the output) are a
  reshape and a mean; others (e.g. 13 -> 6, or 2 -> 4, which repeats pixels)
  are a product with torch's window weights (`_window_matrix`). The sums run in
  float32; the result comes back in the input dtype.

  Arguments:
    size: output side, or (height, width).
  """
  size: Union[int, Tuple[int, int]] = 1

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, size_h, size_w, C)
    (out_h, out_w), (batch, height, width, channels) = _pair(self.size), x.shape
    if (height, width) == (out_h, out_w):
      return x
    if height % out_h == 0 and width % out_w == 0:
      blocks = x.reshape(batch, out_h, height // out_h, out_w, width // out_w, channels)
      return jnp.mean(blocks, axis=(2, 4), dtype=jnp.float32).astype(x.dtype)
    y = jnp.einsum('oh,bhwc->bowc', _window_matrix(height, out_h), x.astype(jnp.float32))
    y = jnp.einsum('pw,bowc->bopc', _window_matrix(width, out_w), y)
    return y.astype(x.dtype)


def _out_side(side: int, kernel: int, stride: int, padding: int) -> int:
  """Output side of a conv or (floor-mode) pool; 0 when the window does not fit."""
  return 0 if side + 2 * padding < kernel else (side + 2 * padding - kernel) // stride + 1


def feature_side(side: int, stem: str) -> int:
  """Side of the last max pool's output for inputs of this side; 0: too small."""
  for layer in ((CIFAR_CONV0,) + FEATURES[1:]) if stem == 'cifar' else FEATURES:
    if layer[0] == 'conv':
      side = _out_side(side, *layer[2:])
    elif layer[0] == 'pool':
      side = _out_side(side, 3, 2, POOL_PADDING[stem])
  return side


def min_input_side(stem: str) -> int:
  """The smallest input side the layout takes (63 for 'imagenet', 1 for 'cifar')."""
  return next(side for side in range(1, 1024) if feature_side(side, stem) > 0)


class AlexNet(nn.Module):
  """AlexNet: five convs, three overlapping max pools, an adaptive average pool
  and three Dense layers with dropout.

  Arguments:
    stem: 'imagenet' (torchvision's layout, inputs >= 63x63) or 'cifar' (the
      same layers for small images, see the module docstring).
    width: base width; every conv and hidden Dense scales by width / 64 (64:
      64, 192, 384, 256, 256 channels and 4096-wide Dense layers).
    dropout: rate before each of the two hidden Dense layers (torchvision 0.5).
    num_classes: number of logits.
    activation: activation name after every conv and hidden Dense.
    dtype: compute dtype; parameters stay float32, logits come back float32.
    cut_at: stop after this named feature and return (None, features); the
      layers after it are never created (transfer learning). None: whole model.
    conv, max_pool: the convolution and max-pooling layers, built as
      conv(features, (k, k), strides=..., padding=..., dtype=..., name=...) and
      max_pool(window, strides, padding, name=...): `nn.Conv` and
      `layers.MaxPool`, or stand-ins with their fields (`jdl.ops.choices`
      gives the CPU's).
  """
  stem: str = 'cifar'
  width: int = 64
  dropout: float = 0.5
  num_classes: int = 10
  activation: str = 'relu'
  dtype: Any = jnp.float32
  cut_at: Optional[str] = None
  conv: Any = nn.Conv
  max_pool: Any = layers.MaxPool

  def __post_init__(self):
    if self.stem not in STEMS:
      raise ConfigError(f'alexnet stem must be one of {list(STEMS)}, got {self.stem!r}')
    if self.width < 1:
      raise ConfigError(f'alexnet width must be >= 1, got {self.width}')
    super().__post_init__()

  def _check_input(self, shape: Sequence[int]) -> None:
    least = min_input_side(self.stem)
    if len(shape) != 4 or min(shape[1:3]) < least:
      size = 'x'.join(map(str, shape[1:]))
      raise ConfigError(f'alexnet (stem={self.stem!r}) cannot take {size} inputs: it needs '
                        f'(B, H, W, C) images of at least {least}x{least}'
                        + (" (stem='cifar' takes any size)" if self.stem == 'imagenet' else ''))

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Returns (logits (B, num_classes) float32, features dict).

    features: 'block1', 'block2', 'block3' (after each max pool), 'avgpool'
    (B, 6, 6, C) ('imagenet') or (B, 2, 2, C) ('cifar'), 'dense1' (the first
    hidden Dense, activated) and 'pre_logits' (B, 4096 * width / 64).

    Arguments:
      x: (B, H, W, C) images, H and W >= 63 for stem='imagenet'.
      train: enables dropout (needs the 'dropout' rng).

    Raises:
      ConfigError: inputs too small for the layout (one line, with the shape).
    """
    self._check_input(x.shape)
    act = activations.get(self.activation)
    scale = lambda channels: max(1, channels * self.width // 64)
    features = {}

    # Features: torchvision's `features` indices as names ('features_0' ...).
    pad = POOL_PADDING[self.stem]
    pool_padding = 'VALID' if pad == 0 else ((pad, pad), (pad, pad))  # -inf padding
    block = 0
    for index, layer in enumerate(FEATURES):
      name = f'features_{index}'
      if index == 0 and self.stem == 'cifar':
        layer = CIFAR_CONV0
      if layer[0] == 'conv':
        _, channels, k, stride, pad = layer
        x = self.conv(scale(channels), (k, k), strides=(stride, stride),
                      padding=((pad, pad), (pad, pad)), dtype=self.dtype, name=name)(x)
      elif layer[0] == 'act':
        x = act(x)  # a function, so no summary row: torchvision's ReLU indices stay unused
      else:
        # 3x3 stride 2: overlapping windows, as in the paper.
        x = self.max_pool(3, 2, pool_padding, name=name)(x)
        block += 1
        features[f'block{block}'] = x
        if self.cut_at == f'block{block}':
          return None, features

    x = AdaptiveAvgPool(POOL_SIZE[self.stem], name='avgpool')(x)  # (B, 6, 6, C) at any H, W
    features['avgpool'] = x
    if self.cut_at == 'avgpool':
      return None, features

    # Classifier: torchvision's `classifier` indices ('classifier_0' ...).
    x = layers.Flatten(name='flatten')(x)  # (B, 6 * 6 * C), (H, W, C) order
    x = nn.Dropout(self.dropout, deterministic=not train, name='classifier_0')(x)
    x = nn.Dense(scale(4096), dtype=self.dtype, name='classifier_1')(x)
    x = act(x)  # classifier_2
    features['dense1'] = x
    if self.cut_at == 'dense1':
      return None, features
    x = nn.Dropout(self.dropout, deterministic=not train, name='classifier_3')(x)
    x = nn.Dense(scale(4096), dtype=self.dtype, name='classifier_4')(x)
    x = act(x)  # classifier_5
    features['pre_logits'] = x  # (B, 4096)
    if self.cut_at == 'pre_logits':
      return None, features
    layers.check_cut(self, features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier_6')(x)
    return logits.astype(jnp.float32), features
