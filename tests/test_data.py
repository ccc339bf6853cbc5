"""Data: TFDS through data_source (mocked), the offline error, the device pipeline."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jdl.data import load_dataset, pipeline, split_validation, tfds_source
from jdl.errors import DataError


# mnist, fashion_mnist, cifar10 and cifar100 are read by jdl.data.classic (tests/test_classic_data.py);
# the TFDS path is tested on other TFDS names of the same shapes.

def test_tfds_mock_loads_without_tensorflow(tmp_path):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = load_dataset("svhn_cropped", data_dir=str(tmp_path))
  images, labels = ds.train
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (12,) and labels.dtype == np.int32
  assert ds.test[0].shape == (12, 32, 32, 3)
  assert ds.num_classes == 10 and len(ds.class_names) == 10
  assert "tensorflow" not in sys.modules  # data_source reads without TensorFlow.


def test_tfds_mock_subset_and_grayscale(tmp_path):
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = load_dataset("kmnist", data_dir=str(tmp_path), num_train=4, num_test=3)
  assert ds.train[0].shape == (4, 28, 28, 1)
  assert ds.test[0].shape == (3, 28, 28, 1)


def test_offline_missing_data_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "network_available", lambda url: False)
  with pytest.raises(DataError) as e:
    load_dataset("svhn_cropped", data_dir=str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  for part in ("'svhn_cropped'", str(tmp_path), "--data_dir", "--dataset=shapes", "network"):
    assert part in message


def test_real_network_probe_fails_fast_offline():
  # This machine has no route out; the probe must say so within its timeout.
  assert tfds_source.network_available("http://host.invalid/") is False


def test_prepare_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "network_available", lambda url: True)
  monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: False)
  with pytest.raises(DataError, match=r"\.\[prepare\]"):
    load_dataset("svhn_cropped", data_dir=str(tmp_path))


def test_download_path_prepares_array_record(tmp_path, monkeypatch):
  """Up to the network boundary: with network and TF, download_and_prepare is
  asked for ArrayRecord (the format data_source reads) in the given data_dir."""
  calls = []

  def fake_prepare(self, **kwargs):
    calls.append((str(self.data_dir), kwargs))
    raise RuntimeError("network boundary")

  monkeypatch.setattr(tfds_source, "network_available", lambda url: True)
  monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_prepare)
  with pytest.raises(RuntimeError, match="network boundary"):
    load_dataset("kmnist", data_dir=str(tmp_path))
  assert calls and calls[0][1] == {"file_format": "array_record"}
  assert calls[0][0].startswith(str(tmp_path))


def test_unknown_dataset():
  with pytest.raises(DataError, match="unknown dataset 'no_such_set'.*shapes"):
    load_dataset("no_such_set")


def test_split_validation_is_seeded_and_disjoint():
  images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
  labels = np.arange(100, dtype=np.int32)
  (tx, ty), (vx, vy) = split_validation((images, labels), 0.2, seed=3)
  assert len(vy) == 20 and len(ty) == 80
  assert not set(ty) & set(vy)
  (_, ty2), _ = split_validation((images, labels), 0.2, seed=3)
  np.testing.assert_array_equal(ty, ty2)
  assert (tx[:, 0, 0, 0] == ty).all()


def test_channel_stats_and_normalize():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  mean, std = pipeline.channel_stats(images)
  ref = images.astype(np.float64) / 255
  np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-4)
  x = pipeline.normalize(jnp.asarray(images), mean, std)
  np.testing.assert_allclose(np.asarray(x).mean(axis=(0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(x).std(axis=(0, 1, 2)), 1, atol=1e-3)


def test_random_translate_shifts_content():
  images = jnp.zeros((64, 8, 8, 1)).at[:, 4, 4, 0].set(1.0)  # One lit pixel.
  out = np.asarray(pipeline.random_translate(jax.random.key(0), images, pad=2))
  assert out.shape == images.shape
  positions = {tuple(np.argwhere(o[..., 0] == 1)[0]) for o in out}
  # Every shift in [-2, 2]^2 keeps the pixel inside; 64 draws see many of them.
  assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in positions)
  assert len(positions) > 10
  assert (out.sum(axis=(1, 2, 3)) == 1).all()


def test_random_flip_mirrors_half():
  images = jnp.broadcast_to(jnp.arange(4.0)[None, None, :, None], (200, 2, 4, 1))
  out = np.asarray(pipeline.random_flip(jax.random.key(1), images))
  flipped = (out[:, 0, 0, 0] == 3)
  assert ((out[:, 0, 0, 0] == 0) | flipped).all()
  assert 60 < flipped.sum() < 140
  np.testing.assert_array_equal(out[flipped][:, 0, :, 0], np.tile([3, 2, 1, 0], (flipped.sum(), 1)))


def test_epoch_permutation_and_take_batch():
  order = pipeline.epoch_permutation(jax.random.key(0), 3, 10)
  assert sorted(np.asarray(order).tolist()) == list(range(10))
  assert not np.array_equal(order, pipeline.epoch_permutation(jax.random.key(0), 4, 10))
  images = jnp.arange(10, dtype=jnp.uint8).reshape(10, 1, 1, 1)
  labels = jnp.arange(10, dtype=jnp.int32)
  x, y = pipeline.take_batch(images, labels, order, 1, 4)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(order[4:8]))
  np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], np.asarray(order[4:8]))


class SequenceToy(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder with a fixed-length sequence feature, registered as 'sequence_toy'."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "signal": tfds.features.Tensor(shape=(40,), dtype=np.float32),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(20), "test": self._generate_examples(8)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"signal": np.full((40,), i, np.float32), "label": i % 10}


def test_tfds_fixed_length_sequence_dataset(tmp_path):
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = load_dataset("sequence_toy", data_dir=str(tmp_path))
  assert ds.train[0].shape == (6, 40, 1) and ds.train[0].dtype == np.float32
  assert ds.input_shape == (40, 1) and ds.num_classes == 10


def test_tfds_dataset_that_does_not_fit_is_one_line(tmp_path):
  with pytest.raises(DataError, match="no 'label' feature"):
    load_dataset("tiny_shakespeare", data_dir=str(tmp_path))
