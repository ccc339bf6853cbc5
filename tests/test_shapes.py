"""The procedural `shapes` dataset: format, determinism, balance, difficulty."""
import numpy as np
import pytest

from jdl.data import load_dataset, shapes


@pytest.fixture(scope="module")
def sample():
  return shapes.generate(500, seed=0)


def test_format_and_balance(sample):
  images, labels = sample
  assert images.shape == (500, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (500,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 50))


def test_same_seed_same_bytes_other_seed_differs(sample):
  images, labels = shapes.generate(500, seed=0)
  np.testing.assert_array_equal(images, sample[0])
  np.testing.assert_array_equal(labels, sample[1])
  other, _ = shapes.generate(500, seed=1)
  assert np.mean(other != sample[0]) > 0.9


def test_splits_are_independent_of_each_others_size():
  a = shapes.load(num_train=100, num_test=50, seed=3)
  b = shapes.load(num_train=300, num_test=50, seed=3)
  np.testing.assert_array_equal(a["test"][0], b["test"][0])
  assert not np.array_equal(a["train"][0][:10], b["test"][0][:10])


def test_images_vary(sample):
  """Random colours, backgrounds and noise: pixels spread, no constant images."""
  images = sample[0].astype(np.float32)
  assert images.std() > 40  # Over the whole sample, in 0..255 units.
  assert images.reshape(len(images), -1).std(axis=1).min() > 5
  # Each pixel position is not fixed (e.g. a constant border) across images.
  assert images.std(axis=0).min() > 30


def test_colour_alone_does_not_give_the_class(sample):
  """Mean colour is class-independent: a nearest-class-mean classifier is near chance."""
  images, labels = sample
  features = images.reshape(len(images), -1, 3).mean(axis=1)  # (N, 3) mean RGB
  test_images, test_labels = shapes.generate(500, seed=1)
  test_features = test_images.reshape(len(test_images), -1, 3).mean(axis=1)
  means = np.stack([features[labels == c].mean(axis=0) for c in range(10)])
  predicted = np.argmin(((test_features[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(predicted == test_labels) < 0.2  # Chance is 0.1.


def test_every_shape_fits_the_unit_disk_and_has_its_own_area():
  """The SDFs are in units of the circumradius: inside points lie in the unit disk."""
  grid = np.linspace(-1.2, 1.2, 481, dtype=np.float32)
  x, y = np.meshgrid(grid, grid)
  cell = (grid[1] - grid[0]) ** 2
  areas = []
  for name, sdf in zip(shapes.CLASS_NAMES, shapes._SDFS):
    inside = sdf(x, y) < 0
    assert np.sqrt(x[inside] ** 2 + y[inside] ** 2).max() <= 1.0 + 0.01, name
    areas.append(inside.sum() * cell)
  # Independent references: the disk (radius 0.9), the ring (radii 0.55-0.95),
  # the square (side 1.36) and the triangle (circumradius 1: area 3 sqrt(3) / 4).
  assert areas[0] == pytest.approx(np.pi * 0.9 ** 2, rel=0.01)
  assert areas[1] == pytest.approx(np.pi * (0.95 ** 2 - 0.55 ** 2), rel=0.01)
  assert areas[2] == pytest.approx(1.36 ** 2, rel=0.01)
  assert areas[4] == pytest.approx(3 * np.sqrt(3) / 4, rel=0.01)
  assert min(areas) > 0.3 * np.pi  # Every shape covers a good part of its disk.


def test_load_dataset_and_grid(tmp_path):
  dataset = load_dataset("shapes", num_train=40, num_test=20, seed=0)
  assert dataset.num_classes == 10 and dataset.class_names == shapes.CLASS_NAMES
  assert dataset.input_shape == (32, 32, 3)
  assert len(dataset.train[1]) == 40 and len(dataset.test[1]) == 20
  path = shapes.save_grid(*dataset.train, str(tmp_path / "grid.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plain_variant_has_two_flat_colours_and_the_same_labels():
  images, labels = shapes.generate(200, seed=0, plain=True)
  np.testing.assert_array_equal(labels, shapes.generate(200, seed=0)[1])
  for image in images:
    pixels = image.reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    top_two = np.sort(counts)[-2:].sum()
    # Background + shape; the rest are the 1-pixel anti-aliased edge.
    assert top_two / len(pixels) > 0.8, (len(colours), top_two)
    assert (pixels == image[0, 0]).all(axis=1).mean() > 0.3  # the corner is background
  dataset = load_dataset("shapes_plain", num_train=20, num_test=10, seed=0)
  assert dataset.name == "shapes_plain" and dataset.num_classes == 10
  np.testing.assert_array_equal(dataset.train[0], shapes.load(20, 10, seed=0, plain=True)["train"][0])
