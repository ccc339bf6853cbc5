"""jdl.data.augmentation: each transform against a NumPy reference, the default
against the original `--augment`, validation, and the preview picture."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl import config as config_lib, train
from jdl.data import Dataset, augmentation as aug, pipeline
from jdl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keras's fill modes as np.pad names them: reflect (dcba|abcd|dcba) is np.pad's
# 'symmetric' (and scipy.ndimage's 'reflect'); constant pads with 0.
NP_PAD_MODE = {"constant": "constant", "nearest": "edge", "reflect": "symmetric", "wrap": "wrap"}


def image(height=6, width=5, channels=2):
  """(H, W, C) float32 with distinct values, none 0 (so the constant fill shows)."""
  return np.arange(1, height * width * channels + 1, dtype=np.float32).reshape(height, width, channels)


def apply_one(img, fill_mode="constant", **params):
  """`aug.apply` on a batch of one; params are per-image values."""
  batched = {k: jnp.asarray(np.asarray(v)[None]) for k, v in params.items()}
  return np.asarray(aug.apply(jnp.asarray(img)[None], batched, fill_mode)[0])


def np_read(img, rows, cols, fill_mode):
  """img[rows, cols] with indices outside the image read as `fill_mode` (via np.pad)."""
  margin = 3 * max(img.shape[:2])
  padded = np.pad(img, ((margin, margin), (margin, margin), (0, 0)), mode=NP_PAD_MODE[fill_mode])
  return padded[np.asarray(rows) + margin, np.asarray(cols) + margin]


@pytest.mark.parametrize("fill_mode", aug.FILL_MODES)
@pytest.mark.parametrize("shift", [(2, -3), (-4, 1), (0, 0), (7, -6)])
def test_shift_with_each_fill_mode(fill_mode, shift):
  img = image()
  height, width, _ = img.shape
  rows, cols = np.meshgrid(np.arange(height) - shift[0], np.arange(width) - shift[1], indexing="ij")
  want = np_read(img, rows, cols, fill_mode)  # the content moves by (dy, dx)
  np.testing.assert_array_equal(apply_one(img, fill_mode, shift=shift), want)


def test_fill_modes_are_keras_and_scipy():
  # Keras's docs on one row abcd: reflect dcba|abcd|dcba, nearest aaaa|abcd|dddd, wrap abcd|abcd|abcd.
  row = np.array([[[1.0], [2.0], [3.0], [4.0]]], np.float32)  # (1, 4, 1): a b c d
  read = lambda mode, dx: apply_one(row, mode, shift=(0, dx))[0, :, 0].tolist()
  assert read("reflect", 2) == [2, 1, 1, 2] and read("reflect", -3) == [4, 4, 3, 2]
  assert read("nearest", 2) == [1, 1, 1, 2] and read("wrap", 1) == [4, 1, 2, 3]
  assert read("constant", 2) == [0, 0, 1, 2]
  ndimage = pytest.importorskip("scipy.ndimage")  # What Keras's ImageDataGenerator calls.
  img = image()
  for mode, scipy_mode in (("constant", "constant"), ("nearest", "nearest"), ("reflect", "reflect"),
                           ("wrap", "grid-wrap")):
    want = ndimage.shift(img, (2, -3, 0), order=0, mode=scipy_mode, cval=0.0)
    np.testing.assert_array_equal(apply_one(img, mode, shift=(2, -3)), want)


def test_flips():
  img = image()
  np.testing.assert_array_equal(apply_one(img, hflip=True), img[:, ::-1])
  np.testing.assert_array_equal(apply_one(img, vflip=True), img[::-1])
  np.testing.assert_array_equal(apply_one(img, hflip=True, vflip=True), img[::-1, ::-1])
  np.testing.assert_array_equal(apply_one(img, hflip=False, vflip=False), img)
  # Flipping is the last geometric step: shift right, then mirror left-right.
  shifted = apply_one(img, shift=(0, 2))
  np.testing.assert_array_equal(apply_one(img, shift=(0, 2), hflip=True), shifted[:, ::-1])


def test_rotation_by_right_angles_is_exact():
  img = image(6, 6)  # square: a right angle maps the grid onto itself
  np.testing.assert_array_equal(apply_one(img, angle=90.0), np.rot90(img, 1))  # counter-clockwise
  np.testing.assert_array_equal(apply_one(img, angle=-90.0), np.rot90(img, -1))
  np.testing.assert_array_equal(apply_one(img, angle=180.0), np.rot90(img, 2))
  np.testing.assert_array_equal(apply_one(img, angle=0.0), img)


@pytest.mark.parametrize("fill_mode", ["constant", "reflect"])
def test_small_rotation_and_shift_against_numpy_nearest_neighbour(fill_mode):
  img = image()
  height, width, _ = img.shape
  angle, shift = 17.0, (1, -1)
  theta = np.deg2rad(angle)
  cy, cx = (height - 1) / 2, (width - 1) / 2
  want = np.zeros_like(img)
  for y in range(height):
    for x in range(width):
      # The content is rotated counter-clockwise about the centre, then shifted:
      # this output pixel reads the input at the inverse of both.
      u, v = x - shift[1] - cx, y - shift[0] - cy
      src_x, src_y = cx + np.cos(theta) * u - np.sin(theta) * v, cy + np.sin(theta) * u + np.cos(theta) * v
      assert min(abs(src_x % 1 - 0.5), abs(src_y % 1 - 0.5)) > 1e-3  # no rounding ties
      want[y, x] = np_read(img, int(np.round(src_y)), int(np.round(src_x)), fill_mode)
  got = apply_one(img, fill_mode, angle=angle, shift=shift)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, apply_one(img, fill_mode, shift=shift))  # it did rotate


def test_erasing():
  images = np.stack([image(), image() + 100, image() + 200])
  boxes = np.array([[1, 2, 3, 2], [0, 0, 0, 5], [4, 3, 2, 2]], np.int32)  # (top, left, h, w); h 0: none
  got = np.asarray(aug.apply(jnp.asarray(images), {"erase": jnp.asarray(boxes)}))
  want = images.copy()
  for i, (top, left, h, w) in enumerate(boxes):
    want[i, top:top + h, left:left + w] = 0.0
  np.testing.assert_array_equal(got, want)


def test_sampled_parameters_stay_in_their_ranges():
  spec = aug.AugmentSpec(width_shift=0.2, height_shift=2.0, horizontal_flip=False, vertical_flip=True,
                         rotation=15.0, erase_prob=1.0, erase_area=(0.1, 0.3))
  sample = jax.jit(aug.sample, static_argnums=(1, 2))
  params = jax.tree.map(np.asarray, sample(jax.random.key(0), (512, 20, 30, 3), spec))
  assert set(params) == {"shift", "vflip", "angle", "erase"}  # no hflip: it is off
  # round(0.2 x 30) = 6 px across, 2 px down; every whole shift occurs.
  assert set(params["shift"][:, 0]) == set(range(-2, 3))
  assert set(params["shift"][:, 1]) == set(range(-6, 7))
  assert params["vflip"].any() and not params["vflip"].all()
  assert np.abs(params["angle"]).max() <= 15.0 and np.abs(params["angle"]).max() > 13.0
  top, left, h, w = params["erase"].T
  assert (h >= 1).all() and (top >= 0).all() and (top + h <= 20).all() and (left + w <= 30).all()
  area = h * w / 600
  assert 0.05 < area.min() and area.max() < 0.4  # 0.1-0.3 up to rounding and clipping
  half = sample(jax.random.key(0), (512, 20, 30, 3), aug.AugmentSpec(erase_prob=0.5))
  assert 0.35 < float((half["erase"][:, 2] > 0).mean()) < 0.65


def test_deterministic_for_a_key():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 10, 9, 3)), jnp.float32)
  spec = aug.AugmentSpec(0.2, 0.2, True, True, 20.0, "reflect", 0.5)
  run = jax.jit(aug.augment, static_argnums=2)
  first = np.asarray(run(jax.random.key(1), x, spec))
  np.testing.assert_array_equal(first, np.asarray(run(jax.random.key(1), x, spec)))
  assert not np.array_equal(first, np.asarray(run(jax.random.key(2), x, spec)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_is_the_original_augment_bit_for_bit(dtype):
  # A run with only --augment must train exactly as before: same images, same key use.
  assert aug.AugmentSpec.from_config(config_lib.TrainConfig()) == aug.AugmentSpec()
  images = np.random.default_rng(0).integers(0, 256, (16, 12, 10, 3), dtype=np.uint8)
  mean, std = pipeline.channel_stats(images)
  old = jax.jit(lambda k, x: pipeline.augment(k, pipeline.normalize(x, mean, std, dtype)))
  new = jax.jit(lambda k, x: aug.augment(k, pipeline.normalize(x, mean, std, dtype)))
  for seed in range(4):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(np.asarray(new(key, images)), np.asarray(old(key, images)))


@pytest.mark.parametrize("changes,message", [
    (dict(aug_width_shift=-0.1), "aug_width_shift must be >= 0"),
    (dict(aug_height_shift=2.5), "aug_height_shift must be a fraction of the side (< 1) or whole pixels"),
    (dict(aug_rotation=200.0), "aug_rotation must be <= 180 degrees"),
    (dict(aug_fill_mode="mirror"), "aug_fill_mode must be one of constant, nearest, reflect, wrap"),
    (dict(aug_erase_prob=1.5), "aug_erase_prob must be in [0, 1]"),
    (dict(aug_erase_area=(0.5, 0.2)), "aug_erase_area must be two fractions 0 < min <= max <= 1"),
])
def test_bad_values_are_one_line_errors(changes, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message)) as error:
    config_lib.validate(config_lib.TrainConfig(augment=True, **changes))
  assert "\n" not in str(error.value)


def test_augmentation_needs_images():
  sequences = (np.zeros((40, 16, 1), np.float32), np.zeros(40, np.int32))
  dataset = Dataset("toy_sequences", sequences, sequences, 2, ("a", "b"))
  with pytest.raises(ConfigError, match=r"--augment needs images \(H, W, C\); toy_sequences"):
    train.load_splits(config_lib.TrainConfig(augment=True, batch_size=8), dataset)


def test_preview_picture(tmp_path):
  from PIL import Image
  images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  mean, std = pipeline.channel_stats(images)
  spec = aug.AugmentSpec(0.25, 0.25, True, False, 30.0, "nearest", 0.5)
  grid = aug.preview(jax.random.key(0), images, mean, std, spec, rows=4)
  assert grid.shape == (60, 8, 8, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[:12], images)  # the originals come back unchanged
  assert not np.array_equal(grid[12:24], images)
  path = aug.save_preview(str(tmp_path / "augmented.png"), images, mean, std, spec, rows=4)
  with Image.open(path) as png:
    width, height = png.size
  cell = 8 * 12 + 2  # scaled to 96 px, plus the border
  assert height == 24 + 5 * cell + 2  # title, then the originals and 4 augmented rows
  assert width > 12 * cell + 2  # 12 columns, plus the row labels' margin


def test_show_augmented_entrypoint_writes_the_picture_without_training(tmp_path):
  png, workdir = tmp_path / "augmented.png", tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.cifar", "--dataset=shapes", "--num_train=100", "--num_test=20",
       "--preset=keras_cnn_augment", "--aug_rotation=10", f"--show_augmented={png}",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert png.stat().st_size > 1000 and not workdir.exists()
  assert "epoch" not in result.stdout and "Total params" not in result.stdout
