"""Pixels and image grids: [-1, 1] floats <-> uint8, and a PNG of samples.

The generators (GAN, colorization) work in [-1, 1]: their last layer is a
tanh. Real images are scaled the same way (`to_unit_range`) before a
discriminator sees them.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from jdl import parallel
from jdl.errors import ConfigError


def to_unit_range(images) -> jax.Array:
  """uint8 images in [0, 255] -> float32 in [-1, 1], the generator's range."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] (values outside are clipped, NaN is drawn black) -> uint8 in [0, 255]."""
  images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image_grid(images, path: str, nrow: int = 8, padding: int = 2, *, scale: int = 1,
                    row_labels=None, title: str = "") -> str:
  """Writes images as one PNG grid, `nrow` images per row, black borders.

  Without labels the PNG is nrow*(W*scale + padding) + padding pixels wide and
  rows*(H*scale + padding) + padding high, rows = ceil(N / nrow)
  (nrow = min(nrow, N)), like torchvision's make_grid; `row_labels` add a
  white margin on the left with one label per row, `title` one on top.

  Arguments:
    images: (N, H, W, C), C = 1 or 3; float in [-1, 1] or uint8.
    path: the PNG to write; parent folders are created.
    nrow: images per row.
    padding: border pixels between and around images.
    scale: each image enlarged this many times (nearest neighbour), so that a
      32x32 sample is big enough to judge.
    row_labels: one text per row (e.g. the class of a conditional GAN's row).
    title: a line of text above the grid.
  Returns:
    `path` (written by process 0 only).
  """
  from PIL import Image

  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ConfigError(f'image grid needs (N, H, W, 1 or 3) images, got shape {images.shape}')
  if images.dtype != np.uint8:
    images = to_uint8(images)
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, height, width, channels = images.shape
  cols = max(1, min(nrow, n))
  rows = -(-n // cols)
  grid = np.zeros((rows * (height + padding) + padding, cols * (width + padding) + padding,
                   channels), np.uint8)
  for i, image in enumerate(images):
    top = padding + (i // cols) * (height + padding)
    left = padding + (i % cols) * (width + padding)
    grid[top:top + height, left:left + width] = image
  png = Image.fromarray(grid[..., 0] if channels == 1 else grid)
  if row_labels is not None or title:
    png = _with_labels(png.convert("RGB"), [str(t) for t in (row_labels or [])], title,
                       rows, height + padding, padding)
  if parallel.is_primary():  # one writer in a multi-host run's shared workdir
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    png.save(path)
  return path


def _with_labels(grid, row_labels, title, rows, row_height, padding):
  """`grid` (a PIL image) on a white canvas with row labels on the left and a title on top."""
  from PIL import Image, ImageDraw, ImageFont
  font = ImageFont.load_default(size=14)
  measure = ImageDraw.Draw(grid)
  label_width = max([measure.textlength(t, font=font) for t in row_labels] + [0])
  left = int(label_width) + 12 if row_labels else 0
  top = 24 if title else 0
  # Wide enough for the title too, over a narrow grid.
  title_width = int(measure.textlength(title, font=font)) + 2 * padding if title else 0
  canvas = Image.new("RGB", (left + max(grid.width, title_width), grid.height + top), "white")
  canvas.paste(grid, (left, top))
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((left + padding, 4), title, fill="black", font=font)
  for r, text in enumerate(row_labels[:rows]):
    middle = top + padding + r * row_height + (row_height - padding) // 2
    draw.text((left - 6, middle), text, fill="black", font=font, anchor="rm")
  return canvas
