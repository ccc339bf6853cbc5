"""Keras-style image augmentation on the device, inside the jitted step.

The course notes augment CIFAR-10 with Keras's
`ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1,
horizontal_flip=True)`. This is that generator's random transforms, in
jax.numpy, vectorised over the batch:
  rotation   about the image centre, uniform in [-rotation, rotation] degrees
             (positive turns the content counter-clockwise, as displayed);
  shift      whole pixels, uniform in [-P, P]; P = round(range x side) for a
             range < 1 (a fraction of the side, as Keras), P = range for a
             range >= 1 (pixels, as Keras);
  flips      left-right and/or up-down, each with probability 1/2;
  fill mode  what the warp reads outside the image, as Keras and
             scipy.ndimage: constant (0, i.e. the mean colour: images are
             normalised first), nearest (aaaa|abcd|dddd), reflect
             (dcba|abcd|dcba, the edge pixel repeated) or wrap (abcd|abcd|abcd);
  erasing    random erasing (Zhong et al. 2017): with probability p one
             rectangle of area U(area range) x H x W and aspect ratio
             log-uniform in [0.3, 1/0.3] (clipped to the image) is set to 0.
Rotation, shift and flips are one gather per image with nearest-neighbour
sampling (a source coordinate is rounded to the closest pixel): no blur, and
without rotation every output pixel is an exact copy of an input pixel.
Keras interpolates bilinearly; at whole-pixel shifts the two agree.

The default `AugmentSpec` is jdl's `--augment` since the start: shifts of up to
4 px with constant fill, then a horizontal flip -- drawn from the key exactly as
`pipeline.augment` draws them, so it gives bit-identical images.
Randomness comes only from the key passed in, so a resumed run replays the
same augmentations.
"""
import dataclasses
import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jdl.data import pipeline

FILL_MODES = ("constant", "nearest", "reflect", "wrap")
ERASE_RATIO = (0.3, 1 / 0.3)  # Random erasing's aspect-ratio range (the paper's).


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Which random transforms `augment` applies (hashable: a static argument).

  Arguments:
    width_shift, height_shift: the largest shift; < 1: a fraction of the side,
      >= 1: whole pixels (Keras's width_shift_range / height_shift_range).
    horizontal_flip, vertical_flip: mirror with probability 1/2.
    rotation: the largest rotation, in degrees (Keras's rotation_range).
    fill_mode: one of FILL_MODES.
    erase_prob: probability of random erasing, per image.
    erase_area: (min, max) area of the erased rectangle, fractions of the image.
  """
  width_shift: float = 4.0
  height_shift: float = 4.0
  horizontal_flip: bool = True
  vertical_flip: bool = False
  rotation: float = 0.0
  fill_mode: str = "constant"
  erase_prob: float = 0.0
  erase_area: Tuple[float, float] = (0.02, 0.33)

  @classmethod
  def from_config(cls, config) -> "AugmentSpec":
    """The spec of a TrainConfig's aug_* fields."""
    return cls(config.aug_width_shift, config.aug_height_shift, config.aug_horizontal_flip,
               config.aug_vertical_flip, config.aug_rotation, config.aug_fill_mode,
               config.aug_erase_prob, tuple(config.aug_erase_area))

  def describe(self) -> str:
    """One line, e.g. 'shift ±4 px (x), ±4 px (y), horizontal flip, fill constant'."""
    unit = lambda r: f"±{r:g} of the side" if r < 1 else f"±{r:g} px"
    parts = [f"shift {unit(self.width_shift)} (x), {unit(self.height_shift)} (y)"]
    if self.rotation:
      parts.append(f"rotation ±{self.rotation:g}°")
    parts += [name for name, on in (("horizontal flip", self.horizontal_flip),
                                    ("vertical flip", self.vertical_flip)) if on]
    parts.append(f"fill {self.fill_mode}")
    if self.erase_prob:
      parts.append(f"erasing p={self.erase_prob:g}, area {self.erase_area[0]:g}-{self.erase_area[1]:g}")
    return ", ".join(parts)


def shift_pixels(shift_range: float, side: int) -> int:
  """The largest shift in whole pixels: round(range x side) for a fraction, else range."""
  return int(round(shift_range * side)) if shift_range < 1 else int(shift_range)


def sample(rng, shape, spec: AugmentSpec) -> Dict[str, jax.Array]:
  """Draws the random parameters of `augment` for a batch of `shape` (B, H, W, C).

  Returns only the enabled transforms' entries:
    'shift': (B, 2) int32, the content's displacement (dy, dx) in pixels;
    'hflip', 'vflip': (B,) bool;
    'angle': (B,) float32, degrees;
    'erase': (B, 4) int32, the rectangle (top, left, height, width); height 0: none.
  The shift and the horizontal flip use the key as `pipeline.augment` does.
  """
  batch, height, width, _ = shape
  translate_key, flip_key = jax.random.split(rng)  # As pipeline.augment.
  rotate_key, vflip_key, erase_key = jax.random.split(jax.random.fold_in(rng, 1), 3)
  params = {}
  pad = np.array([shift_pixels(spec.height_shift, height), shift_pixels(spec.width_shift, width)])
  if pad.any():
    maxval = jnp.broadcast_to(jnp.asarray(2 * pad + 1), (batch, 2))
    offsets = jax.random.randint(translate_key, (batch, 2), 0, maxval)  # (B, 2): (y, x)
    # As pipeline.random_translate: the crop at `offset` of the image padded by
    # `pad` shows the content moved by pad - offset.
    params["shift"] = jnp.asarray(pad)[None, :] - offsets
  if spec.horizontal_flip:
    params["hflip"] = jax.random.bernoulli(flip_key, 0.5, (batch,))
  if spec.vertical_flip:
    params["vflip"] = jax.random.bernoulli(vflip_key, 0.5, (batch,))
  if spec.rotation:
    params["angle"] = jax.random.uniform(rotate_key, (batch,), minval=-spec.rotation,
                                         maxval=spec.rotation)
  if spec.erase_prob:
    params["erase"] = _sample_erase(erase_key, batch, height, width, spec)
  return params


def _sample_erase(rng, batch: int, height: int, width: int, spec: AugmentSpec):
  """(B, 4) int32 rectangles (top, left, height, width), as `sample` documents."""
  apply_key, area_key, ratio_key, top_key, left_key = jax.random.split(rng, 5)
  area = jax.random.uniform(area_key, (batch,), minval=spec.erase_area[0],
                            maxval=spec.erase_area[1]) * (height * width)  # pixels
  ratio = jnp.exp(jax.random.uniform(ratio_key, (batch,), minval=math.log(ERASE_RATIO[0]),
                                     maxval=math.log(ERASE_RATIO[1])))  # height / width
  h = jnp.clip(jnp.round(jnp.sqrt(area * ratio)), 1, height).astype(jnp.int32)
  w = jnp.clip(jnp.round(jnp.sqrt(area / ratio)), 1, width).astype(jnp.int32)
  top = jax.random.randint(top_key, (batch,), 0, height - h + 1)
  left = jax.random.randint(left_key, (batch,), 0, width - w + 1)
  h = jnp.where(jax.random.bernoulli(apply_key, spec.erase_prob, (batch,)), h, 0)
  return jnp.stack([top, left, h, w], axis=1)


def _fill(index, size: int, mode: str):
  """Source indices outside [0, size) mapped as `mode` says; and which were inside."""
  inside = (index >= 0) & (index < size)
  if mode == "reflect":  # Period 2n: 0..n-1 then n-1..0.
    index = jnp.mod(index, 2 * size)
    index = jnp.where(index >= size, 2 * size - 1 - index, index)
  elif mode == "wrap":
    index = jnp.mod(index, size)
  else:  # nearest; constant reads the edge too, then `inside` zeroes it.
    index = jnp.clip(index, 0, size - 1)
  return index, inside


def apply(images, params: Dict[str, jax.Array], fill_mode: str = "constant"):
  """The transforms in `params` (see `sample`), in the order rotate, shift,
  flip, erase.

  Each output pixel reads one input pixel: its coordinates are flipped,
  shifted back and rotated back about the centre ((H-1)/2, (W-1)/2), then
  rounded to the nearest pixel.

  Arguments:
    images: (B, H, W, C), normalised (the constant fill and erasing write 0).
    params: a dict from `sample`, or any subset of its entries.
    fill_mode: one of FILL_MODES.
  """
  batch, height, width, _ = images.shape
  y = jnp.arange(height)[None, :, None]  # (1, H, 1)
  x = jnp.arange(width)[None, None, :]  # (1, 1, W)
  if "vflip" in params:
    y = jnp.where(params["vflip"][:, None, None], height - 1 - y, y)  # (B, H, 1)
  if "hflip" in params:
    x = jnp.where(params["hflip"][:, None, None], width - 1 - x, x)  # (B, 1, W)
  if "shift" in params:
    y = y - params["shift"][:, 0, None, None]
    x = x - params["shift"][:, 1, None, None]
  y, x = jnp.broadcast_to(y, (batch, height, width)), jnp.broadcast_to(x, (batch, height, width))
  if "angle" in params:
    theta = jnp.deg2rad(params["angle"].astype(jnp.float32))[:, None, None]  # (B, 1, 1)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    u, v = x - cx, y - cy  # (B, H, W) float, about the centre
    x = jnp.round(cx + cos * u - sin * v).astype(jnp.int32)
    y = jnp.round(cy + sin * u + cos * v).astype(jnp.int32)
  y, inside_y = _fill(y, height, fill_mode)
  x, inside_x = _fill(x, width, fill_mode)
  images = jax.vmap(lambda image, iy, ix: image[iy, ix])(images, y, x)  # (B, H, W, C)
  if fill_mode == "constant":
    images = jnp.where((inside_y & inside_x)[..., None], images, jnp.zeros((), images.dtype))
  if "erase" in params:
    top, left, h, w = (params["erase"][:, i, None, None] for i in range(4))  # (B, 1, 1) each
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
    images = jnp.where(box[..., None], jnp.zeros((), images.dtype), images)
  return images


def augment(rng, images, spec: AugmentSpec = AugmentSpec()):
  """Random transforms of each image as `spec` says (see the module docstring).

  Arguments:
    rng: a PRNG key; the only source of randomness.
    images: (B, H, W, C), normalised.
    spec: which transforms; the default is jdl's `--augment` (4 px shifts, flips).
  """
  return apply(images, sample(rng, images.shape, spec), spec.fill_mode)


def preview(rng, images, mean, std, spec: AugmentSpec, rows: int = 4) -> np.ndarray:
  """`images` and `rows` augmentations of each, as training sees them, in uint8.

  Normalised, augmented and mapped back to pixels, so the constant fill and
  erasing show as the dataset's mean colour.

  Arguments:
    rng: a PRNG key.
    images: (N, H, W, C) uint8.
    mean, std: (C,) the run's input statistics (`pipeline.channel_stats`).
    spec: the augmentation.
    rows: augmentations per image.
  Returns:
    ((rows + 1) * N, H, W, C) uint8: the originals, then one augmented copy of
    each per row.
  """
  x = pipeline.normalize(jnp.asarray(images), mean, std)
  run = jax.jit(augment, static_argnums=2)  # One compile, not one per operation.
  batches = [x] + [run(jax.random.fold_in(rng, r), x, spec) for r in range(rows)]
  pixels = np.asarray(jnp.concatenate(batches)) * np.asarray(std) + np.asarray(mean)  # [0, 1]
  return np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)


def save_preview(path: str, images, mean, std, spec: AugmentSpec, *, seed: int = 0, rows: int = 4,
                 scale: int = 0) -> str:
  """Writes `preview` as a labelled PNG grid: the originals on top, then `rows`
  rows of augmentations, one column per image (the notes' picture).

  Arguments:
    path: the PNG to write.
    images, mean, std, spec, rows: as `preview`.
    seed: the augmentations' random seed.
    scale: enlargement per image (0: to about 96 pixels high).
  Returns:
    `path`.
  """
  from jdl.images import save_image_grid
  grid = preview(jax.random.key(seed), images, mean, std, spec, rows)
  scale = scale or max(1, 96 // images.shape[1])
  return save_image_grid(grid, path, nrow=len(images), scale=scale,
                         row_labels=["original"] + [f"augmented {r + 1}" for r in range(rows)],
                         title=f"augmentation: {spec.describe()}")
