"""Transposed-convolution decoder and the DCGAN generator and discriminator.

Output size of a transposed convolution along one axis (input `in`, kernel k,
stride s), as `conv_transpose_output_size` computes it:

    'VALID'        out = in*s + max(k - s, 0)   = (in - 1)*s + k  when k >= s
    'SAME'         out = in*s
    p (int)        out = (in - 1)*s + k - 2p + output_padding     (PyTorch's rule)

'VALID' and 'SAME' are Flax's (= Keras Conv2DTranspose's) rules; for k < s Flax
pads VALID outputs up to in*s, where PyTorch's padding=0 gives (in - 1)*s + k.
An integer padding means PyTorch's ConvTranspose2d padding. Flax reads integer
padding differently: it pads the stride-dilated input, so Flax padding q gives
(in - 1)*s + 2 - k + 2q. `torch_padding(k, p)` converts: q = k - 1 - p per side
(plus output_padding after), which yields PyTorch's output size and values.

DCGAN (Radford et al. 2016) as in PyTorch's dcgan example, sized for any image
side base * 2**n (28 = 7 * 4, 32 = 4 * 8, 64 = 4 * 16):

    Generator      z (B, Z) -> Dense -> reshape (B, base, base, W) -> BN -> ReLU
                   -> n - 1 x [ConvTranspose(k4, s2) -> BN -> ReLU], width halved
                   -> ConvTranspose(k4, s2) to C channels -> tanh: (B, H, W, C)
    Discriminator  x (B, H, W, C) -> Conv(k4, s2) -> LeakyReLU(0.2)
                   -> [Conv(k4, s2) -> BN -> LeakyReLU(0.2)]*, width doubled,
                   until the side is <= 4 -> Flatten -> Dense(1): logits (B,)

A k4 s2 'SAME' transposed conv pads (2, 2) in Flax's sense, which is PyTorch's
ConvTranspose2d(kernel_size=4, stride=2, padding=1); the k4 s2 'SAME' conv pads
(1, 1) on even sides, PyTorch's Conv2d(4, 2, padding=1). Kernels are drawn from
N(0, 0.02) and BatchNorm scales from N(1, 0.02), as the paper says; BatchNorm
momentum 0.9 and epsilon 1e-5 are PyTorch's defaults (momentum 0.1 there).

Class conditioning (num_classes > 0): the generator concatenates the one-hot
label to z (or multiplies z by a label embedding, or looks up per-class
BatchNorm scales and offsets); the discriminator concatenates one-hot label
channels, broadcast over the image, to its input (the conditional GAN of
Mirza & Osindero 2014), or projects its last features on a label embedding.
"""
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl import activations
from jdl.errors import ConfigError

KERNEL_INIT = nn.initializers.normal(0.02)  # DCGAN: all weights from N(0, 0.02)
MIN_BASE = 3  # smallest side of the decoder's first feature map
GENERATOR_CONDITIONING = ('concat', 'multiply', 'batchnorm')  # see Generator
DISCRIMINATOR_CONDITIONING = ('input', 'projection', 'none')  # see Discriminator


def _bn_scale_init(key, shape, dtype=jnp.float32):
  """BatchNorm scale from N(1, 0.02), as DCGAN initialises it."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _batch_norm(train: bool, dtype, name: str, affine: bool = True) -> nn.BatchNorm:
  """DCGAN's BatchNorm; affine=False leaves out its own scale and offset."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_scale=affine, use_bias=affine, scale_init=_bn_scale_init,
                      dtype=dtype, name=name)


class ClassBatchNorm(nn.Module):
  """BatchNorm whose scale and offset are looked up per class label.

  Conditional BatchNorm (de Vries et al. 2017), the generator's conditioning in
  Miyato & Koyama 2018 and BigGAN: normalise with the batch statistics (running
  averages in eval mode) as `_batch_norm` does, then x * scale[label] +
  offset[label], so the label acts on every feature map of every layer. Scales
  start from N(1, 0.02) and offsets from 0, as a plain DCGAN BatchNorm does.

  Arguments:
    num_classes: rows of the 'scale' and 'offset' tables (num_classes x C).
    train: use and update batch statistics (apply with mutable=['batch_stats']).
  """
  num_classes: int
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels):
    """x (B, ..., C), labels (B,) int -> (B, ..., C)."""
    x = _batch_norm(self.train, self.dtype, 'norm', affine=False)(x)
    features = x.shape[-1]
    scale = nn.Embed(self.num_classes, features, embedding_init=_bn_scale_init, name='scale')(labels)
    offset = nn.Embed(self.num_classes, features, embedding_init=nn.initializers.zeros,
                      name='offset')(labels)  # (B, C) each
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (features,)
    return x * scale.reshape(shape).astype(x.dtype) + offset.reshape(shape).astype(x.dtype)


# ------------------------------------------------------------------ sizes


def conv_transpose_output_size(size: int, kernel: int, stride: int,
                               padding: Union[str, int], output_padding: int = 0) -> int:
  """Output side of a transposed convolution (see the module docstring).

  Arguments:
    size: input side.
    kernel: kernel side.
    stride: stride (the upsampling factor).
    padding: 'SAME' or 'VALID' (Flax's rules), or an int: PyTorch's padding,
      as `torch_padding` converts it for `nn.ConvTranspose`.
    output_padding: PyTorch's output_padding (int padding only): extra rows at
      the end.
  """
  if isinstance(padding, str):
    if output_padding:
      raise ConfigError('output_padding needs an integer (PyTorch-style) padding')
    if padding.upper() == 'SAME':
      return size * stride
    if padding.upper() == 'VALID':
      return size * stride + max(kernel - stride, 0)
    raise ConfigError(f"conv transpose padding must be 'SAME', 'VALID' or an int, got {padding!r}")
  return (size - 1) * stride + kernel - 2 * padding + output_padding


def torch_padding(kernel: int, padding: int, output_padding: int = 0,
                  ndim: int = 2) -> Tuple[Tuple[int, int], ...]:
  """Flax `nn.ConvTranspose` padding equal to PyTorch's ConvTranspose padding.

  `nn.ConvTranspose(f, (k, k), strides=(s, s), padding=torch_padding(k, p))`
  computes what `torch.nn.ConvTranspose2d(c, f, k, s, padding=p)` does (with
  transpose_kernel=True, the Flax kernel (k, k, out, in) being the PyTorch
  weight (in, out, k, k) transposed (2, 3, 1, 0); without it, the same outputs
  need the kernel flipped spatially): output side (in - 1)*s + k - 2p. Flax
  pads the stride-dilated input, so each side gets k - 1 - p (negative crops).

  Arguments:
    kernel: kernel side k.
    padding: PyTorch's padding p.
    output_padding: PyTorch's output_padding, added after the last row/column.
    ndim: number of spatial axes.
  """
  q = kernel - 1 - padding
  return ((q, q + output_padding),) * ndim


def upsampling_plan(image_shape: Sequence[int],
                    base_width: Optional[int] = None) -> Tuple[int, int, int]:
  """(base_height, base_width_px, n): image sides are base * 2**n, n stride-2 layers.

  n is as large as possible with both base sides >= MIN_BASE (3): 28 -> 7 * 4,
  32 -> 4 * 8, 64 -> 4 * 16, (28, 32) -> (7, 8) * 4.

  Arguments:
    image_shape: (H, W, C) of the images to make.
    base_width: channels of the first feature map; if given, checked to
      survive n - 1 halvings.
  Raises:
    ConfigError: an odd or too small side, or base_width too small.
  """
  if len(image_shape) != 3:
    raise ConfigError(f'decoder image_shape must be (H, W, C), got {tuple(image_shape)}')
  height, width, _ = image_shape
  n = 0
  while all(side % 2 ** (n + 1) == 0 and side // 2 ** (n + 1) >= MIN_BASE
            for side in (height, width)):
    n += 1
  if n == 0:
    raise ConfigError(
        f'decoder cannot make {height}x{width} images: each side must be base * 2**n with '
        f'n >= 1 and base >= {MIN_BASE} (e.g. 28 = 7 * 4, 32 = 4 * 8)')
  if base_width is not None and base_width // 2 ** (n - 1) < 1:
    raise ConfigError(f'decoder base_width {base_width} cannot be halved {n - 1} times '
                      f'for {height}x{width} images; use at least {2 ** (n - 1)}')
  return height // 2 ** n, width // 2 ** n, n


# ------------------------------------------------------------------ modules


class Decoder(nn.Module):
  """Latent vector or feature map -> image, by stride-2 transposed convolutions.

  Dense -> reshape to (B, h, w, base_width) -> BN -> act, then n - 1 blocks of
  ConvTranspose(kernel, stride 2, SAME) -> BN -> act halving the width, then a
  last stride-2 ConvTranspose to C channels -> output activation. (h, w, n) come
  from `upsampling_plan(image_shape)`. Kernels are drawn from N(0, 0.02).

  Arguments:
    image_shape: (H, W, C) of the output; sides base * 2**n (28, 32, 64, ...).
    base_width: channels of the first (h, w) feature map, halved per upsampling.
    kernel_size: transposed-conv kernel side (4 is DCGAN's).
    activation: hidden activation name.
    output_activation: 'tanh' (images in [-1, 1]), 'sigmoid' ([0, 1]) or
      'linear' (any registered activation name works).
    num_classes: 0, or the number of labels of a class-conditional decoder
      (every BatchNorm becomes a `ClassBatchNorm`).
    dtype: compute dtype; parameters stay float32, images come back float32.
    conv_transpose: the transposed-convolution layer: `nn.ConvTranspose`, or a
      stand-in with its fields (`jdl.ops.choices` gives the CPU's).
  """
  image_shape: Sequence[int] = (32, 32, 3)
  base_width: int = 256
  kernel_size: int = 4
  activation: str = 'relu'
  output_activation: str = 'tanh'
  num_classes: int = 0
  dtype: Any = jnp.float32
  conv_transpose: Any = nn.ConvTranspose

  def __post_init__(self):
    upsampling_plan(self.image_shape, self.base_width)  # ConfigError at construction
    activations.get(self.activation)
    activations.get(self.output_activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, z, labels: Optional[jax.Array] = None, *, train: bool = False):
    """Returns images (B, H, W, C) float32.

    Arguments:
      z: (B, Z) latent vectors, or (B, h, w, C') feature maps (flattened first).
      labels: (B,) int class labels, iff num_classes > 0: every BatchNorm is
        then a `ClassBatchNorm` (class-conditional scale and offset).
      train: BatchNorm uses batch statistics and updates 'batch_stats'
        (apply with mutable=['batch_stats']).
    """
    base_h, base_w, n = upsampling_plan(self.image_shape, self.base_width)
    act = activations.get(self.activation)
    if bool(self.num_classes) != (labels is not None):
      raise ConfigError(f'decoder with num_classes={self.num_classes} '
                        + ('needs labels' if self.num_classes else 'takes no labels'))

    def batch_norm(x, name):
      if self.num_classes:
        return ClassBatchNorm(self.num_classes, train, self.dtype, name=name)(x, labels)
      return _batch_norm(train, self.dtype, name)(x)

    x = z.reshape(z.shape[0], -1).astype(self.dtype)  # (B, Z)
    x = nn.Dense(base_h * base_w * self.base_width, use_bias=False, kernel_init=KERNEL_INIT,
                 dtype=self.dtype, name='project')(x)
    x = x.reshape(-1, base_h, base_w, self.base_width)  # (B, h, w, base_width)
    x = act(batch_norm(x, 'project_bn'))
    k = (self.kernel_size, self.kernel_size)
    for i in range(1, n):
      x = self.conv_transpose(self.base_width // 2 ** i, k, strides=(2, 2), padding='SAME',
                              use_bias=False, kernel_init=KERNEL_INIT, dtype=self.dtype,
                              name=f'deconv{i}')(x)  # (B, h * 2**i, w * 2**i, base_width / 2**i)
      x = act(batch_norm(x, f'bn{i}'))
    x = self.conv_transpose(self.image_shape[-1], k, strides=(2, 2), padding='SAME',
                            kernel_init=KERNEL_INIT, dtype=self.dtype,
                            name=f'deconv{n}')(x)  # (B, H, W, C)
    return activations.get(self.output_activation)(x.astype(jnp.float32))


class Generator(nn.Module):
  """DCGAN generator: a tanh `Decoder` of z, optionally class-conditional.

  Arguments:
    image_shape: (H, W, C) of the images; sides base * 2**n (28, 32, 64, ...).
    base_width: channels of the first feature map (DCGAN: 1024 for 64x64).
    num_classes: 0 for an unconditional generator; else the label enters as
      `conditioning` says.
    conditioning: 'concat' (default): the one-hot label (num_classes wide)
      is concatenated to z (Mirza & Osindero 2014). 'multiply': z is
      multiplied elementwise by a learned N(0, 1) embedding of the label
      ('label_embed', num_classes x Z), so every input of the first layer
      depends on the label (as in the PyTorch-GAN cGAN). On shapes_plain the
      label moves a 'multiply' generator's images ~6x more than a 'concat'
      one's, but the classifier's label match after 40 epochs was the same
      (BUILD_NOTES.md). 'batchnorm': z alone enters, and every
      BatchNorm of the decoder has a scale and offset per class
      (`ClassBatchNorm`, as in Miyato & Koyama 2018 and BigGAN).
    kernel_size: transposed-conv kernel side.
    dtype: compute dtype; parameters stay float32, images come back float32.
    conv_transpose: as in `Decoder`.
  """
  image_shape: Sequence[int] = (32, 32, 3)
  base_width: int = 256
  num_classes: int = 0
  conditioning: str = 'concat'
  kernel_size: int = 4
  dtype: Any = jnp.float32
  conv_transpose: Any = nn.ConvTranspose

  def __post_init__(self):
    upsampling_plan(self.image_shape, self.base_width)  # ConfigError at construction
    if self.conditioning not in GENERATOR_CONDITIONING:
      raise ConfigError(f"generator conditioning must be one of {', '.join(GENERATOR_CONDITIONING)}, "
                        f"got {self.conditioning!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, z, labels: Optional[jax.Array] = None, *, train: bool = False):
    """Returns images (B, H, W, C) float32 in [-1, 1].

    Arguments:
      z: (B, Z) latent vectors, usually N(0, 1).
      labels: (B,) int class labels; required iff num_classes > 0.
      train: BatchNorm uses batch statistics (apply with mutable=['batch_stats']).
    """
    z = z.astype(jnp.float32)
    decoder_labels = None  # labels reach the decoder's BatchNorms only for 'batchnorm'
    if self.num_classes:
      if labels is None:
        raise ConfigError(f'conditional generator (num_classes={self.num_classes}) needs labels')
      if self.conditioning == 'multiply':
        embed = nn.Embed(self.num_classes, z.shape[-1], embedding_init=nn.initializers.normal(1.0),
                         name='label_embed')
        z = z * embed(labels)  # (B, Z)
      elif self.conditioning == 'batchnorm':
        decoder_labels = labels
      else:
        z = jnp.concatenate([z, jax.nn.one_hot(labels, self.num_classes)], axis=-1)  # (B, Z + K)
    elif labels is not None:
      raise ConfigError('unconditional generator (num_classes=0) takes no labels')
    return Decoder(image_shape=tuple(self.image_shape), base_width=self.base_width,
                   kernel_size=self.kernel_size, activation='relu', output_activation='tanh',
                   num_classes=self.num_classes if decoder_labels is not None else 0,
                   dtype=self.dtype, conv_transpose=self.conv_transpose,
                   name='decoder')(z, decoder_labels, train=train)


class Discriminator(nn.Module):
  """DCGAN discriminator: strided convs, LeakyReLU(0.2), BatchNorm, one logit.

  Conv(base_width, k4, s2) -> LeakyReLU, then Conv(k4, s2) -> BN -> LeakyReLU
  doubling the width until the larger side is <= 4 (32 -> 16 -> 8 -> 4: 3
  convs; 28 -> 14 -> 7 -> 4: 3), then Flatten -> Dense(1). No pooling.

  Arguments:
    base_width: channels of the first conv, doubled per conv (DCGAN: 64 or 128).
    num_classes: 0 for unconditional; else the label enters as `conditioning`
      says.
    conditioning: 'input': one-hot label channels, broadcast over the image,
      are concatenated to the input (the cGAN of Mirza & Osindero 2014).
      'projection': the logit gains <embed(label), features> on the flattened
      last features (Miyato & Koyama 2018), so the label meets what D has
      recognised instead of raw pixels.
      'none': D's real/fake logit ignores the label, which matters only
      through the class head: the AC-GAN of Odena et al. 2017 (needs
      class_head).
    class_head: also return class logits (B, num_classes) from a second Dense
      on the same features (AC-GAN's auxiliary classifier, Odena et al. 2017).
      Needs 'projection' or 'none' conditioning, whose features are the
      image's alone.
    negative_slope: of the LeakyReLU.
    dtype: compute dtype; parameters stay float32, logits come back float32.
    conv: the convolution layer: `nn.Conv`, or a stand-in with its fields
      (`jdl.ops.choices` gives the CPU's).
  """
  base_width: int = 64
  num_classes: int = 0
  conditioning: str = 'input'
  class_head: bool = False
  negative_slope: float = 0.2
  dtype: Any = jnp.float32
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, images, labels: Optional[jax.Array] = None, *, train: bool = False):
    """Returns logits (B,) float32: sigmoid(logit) is the probability 'real';
    with class_head, (logits, class logits (B, num_classes) float32).

    Arguments:
      images: (B, H, W, C), real ones scaled to [-1, 1] like the generator's.
      labels: (B,) int class labels; required iff num_classes > 0.
      train: BatchNorm uses batch statistics (apply with mutable=['batch_stats']).
    """
    x = images.astype(self.dtype)
    if self.class_head and not self.num_classes:
      raise ConfigError('a class_head needs num_classes > 0')
    if self.conditioning not in DISCRIMINATOR_CONDITIONING:
      raise ConfigError(f"conditioning must be one of {', '.join(DISCRIMINATOR_CONDITIONING)}, "
                        f"got {self.conditioning!r}")
    if self.class_head and self.conditioning == 'input':
      # Measured: such a head labels fakes right 100% of the time from the first
      # epoch, so G's class loss teaches it nothing (BUILD_NOTES.md).
      raise ConfigError("a class_head needs conditioning='projection' or 'none': with 'input' "
                        "label channels it reads the label off its input instead of the image")
    if self.num_classes and self.conditioning == 'none' and not self.class_head:
      raise ConfigError("conditioning='none' needs a class_head: else D never uses the label")
    if self.num_classes and labels is None:
      raise ConfigError(f'conditional discriminator (num_classes={self.num_classes}) needs labels')
    if self.num_classes and self.conditioning == 'input':
      onehot = jax.nn.one_hot(labels, self.num_classes, dtype=self.dtype)[:, None, None, :]
      x = jnp.concatenate([x, jnp.broadcast_to(onehot, x.shape[:3] + (self.num_classes,))],
                          axis=-1)  # (B, H, W, C + K)
    elif not self.num_classes and labels is not None:
      raise ConfigError('unconditional discriminator (num_classes=0) takes no labels')
    side, i = max(x.shape[1:3]), 0
    while i == 0 or side > 4:
      x = self.conv(self.base_width * 2 ** i, (4, 4), strides=(2, 2), padding='SAME',
                    use_bias=i == 0, kernel_init=KERNEL_INIT, dtype=self.dtype,
                    name=f'conv{i + 1}')(x)  # (B, ceil(H / 2**(i+1)), ..., base_width * 2**i)
      if i > 0:
        x = _batch_norm(train, self.dtype, f'bn{i + 1}')(x)
      x = nn.leaky_relu(x, self.negative_slope)
      side, i = -(-side // 2), i + 1
    x = x.reshape(x.shape[0], -1)  # (B, h * w * width)
    logits = nn.Dense(1, kernel_init=KERNEL_INIT, dtype=self.dtype, name='head')(x)  # (B, 1)
    logits = logits[:, 0].astype(jnp.float32)
    if self.num_classes and self.conditioning == 'projection':
      embedding = nn.Embed(self.num_classes, x.shape[-1], embedding_init=KERNEL_INIT,
                           name='label_embed')(labels)  # (B, h * w * width) float32
      logits = logits + jnp.sum(embedding * x.astype(jnp.float32), axis=-1)
    if not self.class_head:
      return logits
    class_logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, dtype=self.dtype,
                            name='class_head')(x)  # (B, K)
    return logits, class_logits.astype(jnp.float32)
