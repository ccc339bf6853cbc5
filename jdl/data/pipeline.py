"""The input pipeline on the device: everything here runs inside jit.

The whole dataset lives on the device: uint8 images (N, H, W, C) or float
sequences (N, T, F). Each training step gathers its batch with indices from a
per-epoch permutation, converts it to float, normalises it per channel (the
last axis) and augments images (`jdl.data.augmentation`) -- no host work per step.
Randomness comes from keys passed in, so the data order of epoch e and the
augmentation of step s are pure functions of (seed, e, s): resuming a run
replays exactly the same batches.
"""
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _scale(dtype) -> float:
  """uint8 pixels are read as x / 255 (in [0, 1]); float inputs as they are."""
  return 1.0 / 255.0 if np.issubdtype(dtype, np.integer) else 1.0


def channel_stats(inputs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel (last axis) mean and std, shape (C,) each.

  uint8 images are measured in [0, 1] units (x / 255). Computed on the host
  once, in float64 chunks of 4096 examples, so the sums keep their precision
  and the memory used does not grow with N.

  Arguments:
    inputs: (N, ..., C) uint8 images or float sequences.
  """
  scale = _scale(inputs.dtype)
  total = np.zeros(inputs.shape[-1])
  total_sq = np.zeros(inputs.shape[-1])
  axes = tuple(range(inputs.ndim - 1))
  for start in range(0, len(inputs), 4096):
    chunk = inputs[start:start + 4096].astype(np.float64) * scale
    total += chunk.sum(axis=axes)
    total_sq += (chunk ** 2).sum(axis=axes)
  count = inputs.size // inputs.shape[-1]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
  return mean.astype(np.float32), std.astype(np.float32)


def normalize(inputs, mean, std, dtype=jnp.float32):
  """(x * scale - mean) / std in `dtype`, per channel; scale = 1/255 for uint8.

  Arguments:
    inputs: (B, ..., C) uint8 images or float sequences.
    mean, std: (C,) from `channel_stats`.
    dtype: the compute dtype of the result.
  """
  x = inputs.astype(jnp.float32) * _scale(inputs.dtype)
  mean = jnp.reshape(jnp.asarray(mean, jnp.float32), (1,) * (x.ndim - 1) + (-1,))  # (1, ..., C)
  std = jnp.reshape(jnp.asarray(std, jnp.float32), (1,) * (x.ndim - 1) + (-1,))
  return ((x - mean) / std).astype(dtype)


def random_translate(rng, images, pad: int):
  """Shifts each image by up to `pad` pixels in x and y, filling with zeros.

  The standard CIFAR "pad 4 and random-crop" augmentation. Applied after
  normalisation, so the zero fill is the dataset's mean colour.

  Arguments:
    rng: a PRNG key.
    images: (B, H, W, C).
    pad: the largest shift in pixels.
  """
  batch, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(rng, (batch, 2), 0, 2 * pad + 1)  # (B, 2): (dy, dx)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  return jax.vmap(crop)(padded, offsets)


def random_flip(rng, images):
  """Mirrors each image left-right with probability 1/2. images: (B, H, W, C)."""
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(rng, images, pad: int = 4, flip: bool = True):
  """Random translation by up to `pad` pixels, then a random horizontal flip.

  jdl's first `--augment`. Training now calls `jdl.data.augmentation.augment`,
  whose default AugmentSpec gives these same images for the same key (tested);
  this stays as that reference.
  """
  translate_rng, flip_rng = jax.random.split(rng)
  if pad:
    images = random_translate(translate_rng, images, pad)
  if flip:
    images = random_flip(flip_rng, images)
  return images


def epoch_permutation(rng, epoch, num_examples: int):
  """The shuffled example order of `epoch`: a pure function of (rng, epoch)."""
  return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def take_batch(images, labels, order, index, batch_size: int):
  """Batch `index` of an epoch: the examples order[index*B : (index+1)*B].

  Arguments:
    images: (N, H, W, C) uint8 on the device.
    labels: (N,) int32.
    order: (N,) int32 permutation from `epoch_permutation`.
    index: the step within the epoch (a traced scalar).
    batch_size: B, static.
  """
  idx = jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
  return images[idx], labels[idx]
