"""`shapes`: a CIFAR-shaped procedural dataset, generated offline in seconds.

Each image is one of ten shapes drawn at a random position, scale and rotation,
in a random colour on a random background (flat colour + linear gradient +
low-frequency colour texture), behind which sit a few small distractor blobs and
strokes, plus per-pixel noise. Colours are drawn independently of the class, so
the label is carried by spatial structure alone: a CNN learns it far better than
an MLP, and translation + horizontal-flip augmentation are label-preserving
(every shape is mirror-symmetric, and rotation is random anyway).

Shapes are rendered from signed distance functions (SDFs) in the shape's own
frame, scaled so every shape fits in the unit disk; a 1-pixel linear ramp of the
distance gives anti-aliased edges without supersampling. Everything is
vectorised NumPy over chunks of images (50,000 images take a few seconds on one
core) and deterministic given the seed.

  images, labels = generate(1000, seed=0)        # uint8 (1000, 32, 32, 3), int32
  splits = load(num_train=10_000, num_test=2_000, seed=0)
  save_grid(*splits['train'], '/tmp/shapes.png')  # or: python -m jdl.data.shapes

`shapes_plain` (`plain=True`) is the easy variant: flat colours only, no
distractors or noise; an offline stand-in for MNIST when a small GAN must
learn to draw the class.

Two variants serve the heads beyond softmax (`jdl.heads`), both flat-coloured
like `shapes_plain` (the point is the head, not the clutter; plain=False gives
them the full backgrounds and noise):
  task='multilabel'  (`shapes_multilabel`) 1-3 shapes of distinct classes per
                     image, each in its own quadrant (so none hides another),
                     MULTI_SCALE_RANGE x side; labels a multi-hot int32 (N, 10) row.
  task='size'        (`shapes_size`) the `shapes_plain` images; the target is the
                     shape's circumradius in pixels, float32 (N,), uniform in
                     SCALE_RANGE x side (6.4-12.2 px at 32). Every class's SDF
                     fills the unit disk differently, so the model must learn
                     size per class.
"""
import os
import sys
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

CLASS_NAMES = ("disk", "ring", "square", "frame", "triangle",
               "cross", "star", "crescent", "heart", "bar")
IMAGE_SHAPE = (32, 32, 3)

# --- Difficulty knobs. Lengths are fractions of the image side unless noted; ---
# --- colours are in [0, 1] (1 = 255).                                         ---
SCALE_RANGE = (0.20, 0.38)  # circumradius of the shape / image side (6.4-12.2 px at 32)
EDGE_MARGIN = 0.03          # min gap between the shape's bounding circle and the border
MIN_CONTRAST = 0.25         # min |luminance(fg) - luminance(bg)|, so the shape is visible
GRADIENT_AMPLITUDE = 0.25   # max per-channel change across the background's linear ramp
TEXTURE_AMPLITUDE = 0.10    # max per-channel amplitude of the low-frequency texture
TEXTURE_CELLS = 3           # texture frequency: grid cells across the image
FG_TEXTURE_AMPLITUDE = 0.05  # the same, applied to the shape's own colour (shading)
NUM_DISTRACTORS = 3         # max distractor blobs/strokes per image (uniform 0..max)
DISTRACTOR_RADIUS = (0.015, 0.045)  # stroke half-width / image side (0.5-1.4 px at 32)
DISTRACTOR_LENGTH = 0.2     # max stroke length / image side (0 = round blob)
NOISE_STD = 0.04            # std of i.i.d. Gaussian pixel noise (about 10 / 255)
# shapes_multilabel: up to MAX_SHAPES shapes, each inside one 16x16 quadrant at 32.
MAX_SHAPES = 3
MULTI_SCALE_RANGE = (0.17, 0.22)  # circumradius / image side (5.4-7.0 px at 32)

_CHUNK = 2048  # images per vectorised chunk: bounds memory (~100 MB) and fixes the RNG stream


# --- Signed distance functions, in units of the circumradius (all fit in the unit disk). ---
# Arguments are float32 arrays x, y of any (same) shape; negative = inside.

def _length(x, y):
  return np.sqrt(x * x + y * y)


def _box(x, y, half_w, half_h):
  dx, dy = np.abs(x) - half_w, np.abs(y) - half_h
  outside = _length(np.maximum(dx, 0), np.maximum(dy, 0))
  return outside + np.minimum(np.maximum(dx, dy), 0)


def _segment(x, y, ax, ay, bx, by):
  """Distance to the segment a-b (the SDF of a stroke is this minus its half-width)."""
  px, py, ux, uy = x - ax, y - ay, bx - ax, by - ay
  t = np.clip((px * ux + py * uy) / np.maximum(ux * ux + uy * uy, 1e-12), 0, 1)
  return _length(px - t * ux, py - t * uy)


def _triangle(x, y):
  # Equilateral, centroid at the origin, circumradius 1 (after Inigo Quilez).
  r, k = np.float32(np.sqrt(3) / 2), np.float32(np.sqrt(3))
  x, y = np.abs(x) - r, y + r / k
  fold = x + k * y > 0
  x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
  x = x - np.clip(x, -2 * r, 0)
  return -_length(x, y) * np.sign(y)


def _star(x, y, inner=0.45):
  # Five-pointed star with outer radius 1 and inner radius `inner` (after Inigo Quilez).
  k1x, k1y = 0.809016994, -0.587785252
  x = np.abs(x)
  for kx in (k1x, -k1x):
    dot = 2 * np.maximum(kx * x + k1y * y, 0)
    x, y = x - dot * kx, y - dot * k1y
  x, y = np.abs(x), y - 1
  bax, bay = -inner * k1y, inner * k1x - 1
  h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0, 1)
  return _length(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _heart(x, y):
  # Inigo Quilez's heart (tip at 0, lobes up to y=1.10) recentred on its bounding circle.
  s = np.float32(0.63)
  x, y = np.abs(x) * s, y * s + s
  lobe = _length(x - 0.25, y - 0.75) - np.float32(np.sqrt(2) / 4)
  m = np.maximum(x + y, 0) * 0.5
  body = np.sqrt(np.minimum(x * x + (y - 1) ** 2, (x - m) ** 2 + (y - m) ** 2)) * np.sign(x - y)
  return np.where(x + y > 1, lobe, body) / s


_SDFS = (
    lambda x, y: _length(x, y) - 0.9,                                   # disk
    lambda x, y: np.abs(_length(x, y) - 0.75) - 0.2,                    # ring: 0.55..0.95
    lambda x, y: _box(x, y, 0.68, 0.68),                                # square
    lambda x, y: np.abs(_box(x, y, 0.56, 0.56)) - 0.14,                 # frame: 0.42..0.70
    _triangle,
    lambda x, y: np.minimum(_box(x, y, 0.95, 0.27), _box(x, y, 0.27, 0.95)),  # cross
    _star,
    lambda x, y: np.maximum(_length(x, y) - 0.9, 0.7 - _length(x - 0.45, y)),  # crescent
    _heart,
    lambda x, y: _segment(x, y, -0.7, 0, 0.7, 0) - 0.28,                # bar: 3.5:1 stadium
)
assert len(_SDFS) == len(CLASS_NAMES)


def _luminance(rgb):
  return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _colour_pairs(rng, n):
  """Foreground and background colours (n, 3) in [0, 1] with enough luminance contrast."""
  fg = rng.random((n, 3), dtype=np.float32)
  bg = rng.random((n, 3), dtype=np.float32)
  while True:  # Rejection: resample the failing pairs (about a third per round).
    bad = np.abs(_luminance(fg) - _luminance(bg)) < MIN_CONTRAST
    if not bad.any():
      return fg, bg
    fg[bad] = rng.random((bad.sum(), 3), dtype=np.float32)
    bg[bad] = rng.random((bad.sum(), 3), dtype=np.float32)


# Rendering works channels-first, (n, 3, H, W), so that broadcasting an (n, 1, H, W)
# coverage map runs over whole contiguous image planes (channels-last broadcasting
# has an inner loop of length 3 and is much slower); `generate` transposes at the end.

def _smooth_field(grid, size):
  """Bilinearly upsamples a coarse (n, 3, g, g) grid to (n, 3, size, size).

  Bilinear interpolation reproduces linear functions exactly, so a flat colour
  and a linear gradient folded into the grid come out of the same single GEMM.
  """
  n, _, nodes, _ = grid.shape
  pos = (np.arange(size, dtype=np.float32) + 0.5) / size * (nodes - 1)  # pixel centres, in cells
  weights = np.maximum(1 - np.abs(pos[:, None] - np.arange(nodes, dtype=np.float32)), 0)
  kernel = np.kron(weights, weights)  # (size * size, g * g): [h*size+w, i*g+j] = W[h,i] W[w,j]
  return (grid.reshape(n * 3, nodes * nodes) @ kernel.T).reshape(n, 3, size, size)


def _colour_field(rng, colour, gradient, texture):
  """A coarse (n, 3, g, g) grid: colour (n, 3) + a random linear ramp + random texture.

  Arguments:
    colour: (n, 3) mean colour in [0, 1].
    gradient: max per-channel change of the ramp across the image.
    texture: max per-channel amplitude of the texture at each grid node.
  """
  n, nodes = len(colour), TEXTURE_CELLS + 1
  pos = np.linspace(-0.5, 0.5, nodes, dtype=np.float32)  # node positions / image side
  angle = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)).astype(np.float32)
  ramp = pos[None, None, None, :] * np.cos(angle) + pos[None, None, :, None] * np.sin(angle)
  ramp_colour = rng.uniform(-gradient, gradient, (n, 3, 1, 1)).astype(np.float32)
  grid = rng.uniform(-texture, texture, (n, 3, nodes, nodes)).astype(np.float32)
  grid += ramp * ramp_colour
  grid += colour[:, :, None, None]
  return grid


def _composite(image, alpha, colour, scratch):
  """In place: image += alpha * (colour - image); all (n, 3 or 1, H or 1, W or 1).

  Reusing one scratch buffer avoids allocating (and page-faulting) temporaries.
  """
  np.subtract(colour, image, out=scratch)
  np.multiply(scratch, alpha, out=scratch)
  np.add(image, scratch, out=image)


def _render(rng, labels, size, plain=False):
  """Images float32 (n, 3, size, size), about [0, 1] (unclipped), for int labels (n,),
  and each shape's circumradius in pixels, float32 (n,).

  plain: flat background and shape colours, no distractors and no noise.
  """
  n = len(labels)
  coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres, in pixels
  px, py = coords[None, None, :], coords[None, :, None]  # broadcast to (m, H, W)
  scratch = np.empty((n, 3, size, size), np.float32)
  alpha = np.zeros((n, 1, size, size), np.float32)  # coverage of the layer being drawn

  # Background: flat colour + linear gradient + low-frequency texture, in one upsampling.
  fg, bg = _colour_pairs(rng, n)
  if plain:
    image = np.broadcast_to(bg[:, :, None, None], (n, 3, size, size)).copy()
  else:
    image = _smooth_field(_colour_field(rng, bg, GRADIENT_AMPLITUDE, TEXTURE_AMPLITUDE), size)

  # Distractors behind the shape: strokes of random length (0 = blob), colour and angle.
  # Slot k is drawn only in the images that have more than k distractors.
  count = np.zeros(n, int) if plain else rng.integers(0, NUM_DISTRACTORS + 1, n)
  for k in range(NUM_DISTRACTORS):
    idx = np.flatnonzero(count > k)
    m = len(idx)
    cx, cy = rng.random((2, m, 1, 1), dtype=np.float32) * size
    half = rng.uniform(0, DISTRACTOR_LENGTH / 2, (m, 1, 1)).astype(np.float32) * size
    theta = rng.uniform(0, np.pi, (m, 1, 1)).astype(np.float32)
    width = rng.uniform(*DISTRACTOR_RADIUS, (m, 1, 1)).astype(np.float32) * size
    hx, hy = half * np.cos(theta), half * np.sin(theta)
    dist = _segment(px - cx, py - cy, -hx, -hy, hx, hy) - width  # (m, H, W) pixels
    alpha.fill(0)
    alpha[idx, 0] = np.clip(0.5 - dist, 0, 1)  # 1-pixel soft edge
    colour = rng.random((n, 3, 1, 1), dtype=np.float32)
    _composite(image, alpha, colour, scratch)

  # The shape: a pose, then the class's SDF in its own frame (unit circumradius).
  radius = rng.uniform(*SCALE_RANGE, n).astype(np.float32) * size  # pixels
  slack = np.maximum(size / 2 - radius - EDGE_MARGIN * size, 0)
  cx, cy = size / 2 + rng.uniform(-1, 1, (2, n)).astype(np.float32) * slack
  theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
  alpha = _shape_coverage(labels, radius, cx, cy, theta, size)
  if plain:
    shape = fg[:, :, None, None]
  else:
    shape = _smooth_field(_colour_field(rng, fg, 0, FG_TEXTURE_AMPLITUDE), size)
  _composite(image, alpha, shape, scratch)
  if not plain:
    _add_noise(rng, image, scratch)
  return image, radius


def _shape_coverage(labels, radius, cx, cy, theta, size):
  """Coverage in [0, 1], (n, 1, size, size) float32, of one shape per image.

  Arguments:
    labels: (n,) int class of each shape.
    radius, cx, cy, theta: (n,) float32 circumradius and centre in pixels,
      rotation in radians.
  """
  coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres, in pixels
  px, py = coords[None, None, :], coords[None, :, None]  # broadcast to (m, H, W)
  alpha = np.zeros((len(labels), 1, size, size), np.float32)
  for label, sdf in enumerate(_SDFS):
    idx = np.flatnonzero(labels == label)
    cos, sin = np.cos(theta[idx])[:, None, None], np.sin(theta[idx])[:, None, None]
    r = radius[idx][:, None, None]
    dx, dy = px - cx[idx][:, None, None], py - cy[idx][:, None, None]  # (m, H, W) pixels
    dist = sdf((cos * dx + sin * dy) / r, (cos * dy - sin * dx) / r)
    alpha[idx, 0] = np.clip(0.5 - dist * r, 0, 1)  # distance in pixels -> coverage
  return alpha


def _add_noise(rng, image, scratch):
  """In place: pixel noise, uniform with std NOISE_STD (uniform bytes are far cheaper than normals)."""
  noise = np.frombuffer(rng.bytes(image.size), np.uint8).reshape(image.shape)
  step = np.float32(NOISE_STD * np.sqrt(12) / 256)  # std of uniform bytes is ~256 / sqrt(12)
  image += np.multiply(noise, step, out=scratch)
  image -= 127.5 * step


def _render_multilabel(rng, count, size, plain=False):
  """Images float32 (n, 3, size, size) with count[i] (1..MAX_SHAPES) shapes of
  distinct classes, one per quadrant, and their multi-hot labels int32 (n, 10)."""
  n, num_classes = len(count), len(CLASS_NAMES)
  scratch = np.empty((n, 3, size, size), np.float32)
  _, bg = _colour_pairs(rng, n)
  if plain:
    image = np.broadcast_to(bg[:, :, None, None], (n, 3, size, size)).copy()
  else:
    image = _smooth_field(_colour_field(rng, bg, GRADIENT_AMPLITUDE, TEXTURE_AMPLITUDE), size)
  classes = rng.permuted(np.tile(np.arange(num_classes), (n, 1)), axis=1)  # distinct per image
  quadrants = rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1)
  labels = np.zeros((n, num_classes), np.int32)
  half = size / 2
  for k in range(MAX_SHAPES):  # slot k: the images with more than k shapes
    idx = np.flatnonzero(count > k)
    m = len(idx)
    labels[idx, classes[idx, k]] = 1
    radius = rng.uniform(*MULTI_SCALE_RANGE, m).astype(np.float32) * size  # pixels
    slack = np.maximum(half / 2 - radius - EDGE_MARGIN * size, 0)
    corner = np.stack([quadrants[idx, k] % 2, quadrants[idx, k] // 2]).astype(np.float32) * half
    cx, cy = corner + half / 2 + rng.uniform(-1, 1, (2, m)).astype(np.float32) * slack
    theta = rng.uniform(0, 2 * np.pi, m).astype(np.float32)
    alpha = np.zeros((n, 1, size, size), np.float32)
    alpha[idx] = _shape_coverage(classes[idx, k], radius, cx, cy, theta, size)
    colour = np.zeros((n, 3, 1, 1), np.float32)
    colour[idx, :, 0, 0] = _contrasting(rng, bg[idx])
    _composite(image, alpha, colour, scratch)
  if not plain:
    _add_noise(rng, image, scratch)
  return image, labels


def _contrasting(rng, bg):
  """Colours (n, 3) whose luminance differs from each row of bg (n, 3) by >= MIN_CONTRAST."""
  fg = rng.random(bg.shape, dtype=np.float32)
  while True:
    bad = np.abs(_luminance(fg) - _luminance(bg)) < MIN_CONTRAST
    if not bad.any():
      return fg
    fg[bad] = rng.random((bad.sum(), 3), dtype=np.float32)


def generate(num_examples: int, seed: Union[int, np.random.SeedSequence],
             image_size: int = 32, plain: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """Generates `num_examples` images with balanced classes.

  Labels are `i % 10` shuffled by the seed, so every class has
  `num_examples // 10` or one more examples. The same seed gives byte-identical
  arrays.

  Arguments:
    num_examples: how many images to make.
    seed: an int or a `np.random.SeedSequence` (as `load` uses for its splits).
    image_size: side of the square images in pixels; shape sizes scale with it.
    plain: the easy variant (`shapes_plain`): one flat colour for the
      background and one for the shape; no gradient, texture, distractors or
      noise. Same classes, poses and colour pairs as the full set otherwise.
  Returns:
    images uint8 (N, image_size, image_size, 3) and labels int32 (N,).
  """
  images, labels, _ = _generate(num_examples, seed, image_size, plain)
  return images, labels


def _to_uint8(chunk):
  """float (n, 3, H, W) about [0, 1] -> uint8 (n, H, W, 3), in place where it can."""
  chunk *= 255
  chunk += 0.5  # so that truncation to uint8 rounds to nearest
  np.clip(chunk, 0, 255, out=chunk)
  return chunk.transpose(0, 2, 3, 1)  # (n, H, W, 3)


def _generate(num_examples, seed, image_size=32, plain=False):
  """`generate`'s images and labels, and each shape's circumradius in pixels, float32 (N,)."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_examples) % len(CLASS_NAMES)).astype(np.int32)
  images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
  radius = np.empty(num_examples, np.float32)
  for start in range(0, num_examples, _CHUNK):
    chunk, radius[start:start + _CHUNK] = _render(rng, labels[start:start + _CHUNK], image_size, plain)
    images[start:start + _CHUNK] = _to_uint8(chunk)
  return images, labels, radius


def generate_multilabel(num_examples: int, seed: Union[int, np.random.SeedSequence],
                        image_size: int = 32, plain: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """Images with 1 to MAX_SHAPES shapes of distinct classes (`shapes_multilabel`).

  The number of shapes is uniform in 1..MAX_SHAPES and the classes a uniform
  random subset, so each label is present in about 20% of the images. The same
  seed gives byte-identical arrays. plain: flat colours, no noise (as
  `generate`'s plain; `shapes_multilabel` is plain).

  Returns:
    images uint8 (N, image_size, image_size, 3) and multi-hot labels int32 (N, 10).
  """
  rng = np.random.default_rng(seed)
  count = rng.integers(1, MAX_SHAPES + 1, num_examples)
  images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
  labels = np.empty((num_examples, len(CLASS_NAMES)), np.int32)
  for start in range(0, num_examples, _CHUNK):
    chunk, labels[start:start + _CHUNK] = _render_multilabel(rng, count[start:start + _CHUNK],
                                                             image_size, plain)
    images[start:start + _CHUNK] = _to_uint8(chunk)
  return images, labels


def load(num_train: int = 10000, num_test: int = 2000, seed: int = 0,
         image_size: int = 32, plain: bool = False,
         task: str = "class") -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """The `shapes` train and test splits.

  The splits come from independent child streams of `seed`, so changing
  `num_train` leaves the test set unchanged (and vice versa).

  Arguments:
    num_train: number of training images.
    num_test: number of test images.
    seed: the dataset seed.
    image_size: side of the square images in pixels.
    plain: the easy variant, as in `generate`.
    task: 'class' (class ids), 'multilabel' (`generate_multilabel`) or 'size'
      (the images with the shape's circumradius in pixels as target).
  Returns:
    {'train': (images, labels), 'test': (images, labels)}: labels int32 (N,),
    int32 multi-hot (N, 10) or float32 radii (N,).
  """
  make = {"class": lambda n, s: generate(n, s, image_size, plain),
          "multilabel": lambda n, s: generate_multilabel(n, s, image_size, plain),
          "size": lambda n, s: _generate(n, s, image_size, plain)[::2]}[task]
  train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
  return {"train": make(num_train, train_seed), "test": make(num_test, test_seed)}


def save_grid(images: np.ndarray, labels: np.ndarray, path: str,
              class_names: Sequence[str] = CLASS_NAMES, rows: int = 4,
              cols: int = 10, scale: float = 1.2) -> str:
  """Writes the first `rows * cols` images as a PNG grid titled by class.

  Arguments:
    images: uint8 (N, H, W, C) images, C = 1 or 3.
    labels: int (N,) labels, indices into `class_names`, or multi-hot (N, C) rows.
    path: the PNG file to write (parent folders are created).
    class_names: one name per class, used as the panel titles.
    rows: grid rows.
    cols: grid columns.
    scale: size of one panel in inches.
  Returns:
    `path`.
  """
  import matplotlib
  matplotlib.use("Agg")  # Files only; no display needed.
  import matplotlib.pyplot as plt

  n = min(len(images), rows * cols)
  rows = max(1, -(-n // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale * 1.15), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < n:
      image = images[i]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                cmap="gray" if image.shape[-1] == 1 else None, interpolation="nearest")
      label = labels[i]  # a class id, or a multi-hot row (shapes_multilabel)
      ax.set_title(", ".join(class_names[j] for j in np.flatnonzero(label)) if np.ndim(label)
                   else class_names[int(label)], fontsize=8 if np.ndim(label) == 0 else 6)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv: Optional[Sequence[str]] = None) -> None:
  """`python -m jdl.data.shapes [PATH] [SEED] [plain]`: writes a grid of examples to look at."""
  argv = sys.argv[1:] if argv is None else argv
  path = argv[0] if argv else "shapes_grid.png"
  seed = int(argv[1]) if len(argv) > 1 else 0
  plain = len(argv) > 2 and argv[2] == "plain"
  images, labels = generate(60, seed, plain=plain)
  print(save_grid(images, labels, path, rows=6))


if __name__ == "__main__":
  main()
