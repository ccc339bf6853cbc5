"""The classic datasets (jdl.data.classic): IDX and CIFAR-binary parsing, the search
order, downloads from a real HTTP server on 127.0.0.1, every kind of bad file, the
real Debian Fashion-MNIST (statistics and a short training run), and every model
on 28x28x1 inputs.

Small archives in the real formats are built here, and their SHA-256 pinned in
place of the real ones. Nothing contacts any address but 127.0.0.1: conftest.py
points $JDL_DATA_MIRROR at a dead loopback port and the download tests at
their own server.
"""
import dataclasses
import gzip
import hashlib
import io
import os
import socket
import struct
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl.data import classic, load_dataset, locations, tfds_source
from jdl.errors import DataError
from jdl.models import MODELS, build_model
from local_data_server import LocalDataServer

IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def idx(array: np.ndarray) -> bytes:
  """IDX bytes of a uint8 array: magic (0, 0, 0x08, ndim), big-endian sizes, data."""
  return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + \
      array.astype(np.uint8).tobytes()


def mnist_files(num_train=20, num_test=10, seed=0):
  """(files name -> .gz bytes, (train images, labels), (test images, labels))."""
  rng = np.random.default_rng(seed)
  splits = [(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
            for n in (num_train, num_test)]
  arrays = [splits[0][0], splits[0][1], splits[1][0], splits[1][1]]
  return {name: gzip.compress(idx(a), mtime=0) for name, a in zip(IDX_NAMES, arrays)}, *splits


def cifar_archive(folder, members) -> bytes:
  """A .tar.gz holding `members` (name -> bytes) under `folder/`, as the CIFAR archives do."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(f"{folder}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def cifar10_archive(per_batch=3, seed=0):
  """(archive bytes, CHW images (N, 3, 32, 32) of train then test, labels)."""
  rng = np.random.default_rng(seed)
  n = 6 * per_batch  # five train batches and the test batch
  images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)  # (N, 1 + 3072)
  batches = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
  members = {b: records[i * per_batch:(i + 1) * per_batch].tobytes() for i, b in enumerate(batches)}
  members["batches.meta.txt"] = ("\n".join(f"class{i}" for i in range(10)) + "\n\n").encode()
  members["readme.html"] = b"<html>not read</html>"
  return cifar_archive("cifar-10-batches-bin", members), images, labels


def pin(monkeypatch, name, files, content=False):
  """Makes `files` (name -> bytes) the pinned distribution files of dataset `name`."""
  remotes = tuple(
      classic.Remote(n, f"http://upstream.invalid/{n}", len(b), sha256(b),
                     sha256(gzip.decompress(b)) if content else None)
      for n, b in files.items())
  monkeypatch.setitem(classic.FILES, name, remotes)


def write(directory, files):
  os.makedirs(directory, exist_ok=True)
  for name, data in files.items():
    with open(os.path.join(directory, name), "wb") as f:
      f.write(data)


def dead_port_url() -> str:
  """A loopback URL nothing listens on (the port was free a moment ago)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{s.getsockname()[1]}/"


def one_line_error(fn) -> str:
  with pytest.raises(DataError) as e:
    fn()
  message = str(e.value)
  assert "\n" not in message
  return message


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty jdl data cache for this test."""
  path = tmp_path / "cache"
  monkeypatch.setenv("JDL_DATA_CACHE", str(path))
  return path


# --- Downloads from a local HTTP server ---

def test_download_then_cache_without_server(cache, monkeypatch):
  files, (train_x, train_y), (test_x, test_y) = mnist_files()
  pin(monkeypatch, "mnist", files)
  with LocalDataServer(files) as server:
    monkeypatch.setenv("JDL_DATA_MIRROR", server.url)
    ds = load_dataset("mnist")
  assert sorted(server.requests) == sorted(IDX_NAMES)
  assert sorted(os.listdir(cache / "mnist")) == sorted(IDX_NAMES)  # No temporary files left.
  assert ds.train[0].shape == (20, 28, 28, 1) and ds.train[0].dtype == np.uint8
  assert ds.train[1].dtype == np.int32 and ds.num_classes == 10
  np.testing.assert_array_equal(ds.train[0][..., 0], train_x)
  np.testing.assert_array_equal(ds.test[1], test_y)
  assert ds.class_names == tuple("0123456789")
  # The server is gone and the mirror dead: the second load reads the cache.
  monkeypatch.setenv("JDL_DATA_MIRROR", dead_port_url())
  again = load_dataset("mnist", num_train=5, num_test=4)
  np.testing.assert_array_equal(again.train[0][..., 0], train_x[:5])
  assert again.test[1].shape == (4,)


def test_download_cifar10_binary_archive_decodes_hwc(cache, monkeypatch):
  archive, images, labels = cifar10_archive()
  pin(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
  with LocalDataServer({"cifar-10-binary.tar.gz": archive}) as server:
    monkeypatch.setenv("JDL_DATA_MIRROR", server.url)
    ds = load_dataset("cifar10")
  assert server.requests == ["cifar-10-binary.tar.gz"]
  assert ds.train[0].shape == (15, 32, 32, 3) and ds.test[0].shape == (3, 32, 32, 3)
  assert ds.train[0].dtype == np.uint8 and ds.train[1].dtype == np.int32
  assert ds.train[0].flags.c_contiguous  # HWC in memory too, not a transposed view
  # Record bytes are CHW planes: pixel (y, x) of channel c is images[n, c, y, x].
  np.testing.assert_array_equal(ds.train[0], images[:15].transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(ds.test[0], images[15:].transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(np.concatenate([ds.train[1], ds.test[1]]), labels)
  assert ds.class_names == tuple(f"class{i}" for i in range(10))
  assert os.listdir(cache / "cifar10") == ["cifar-10-binary.tar.gz"]


def test_cifar10_downloads_verifies_and_trains_end_to_end(cache, monkeypatch, tmp_path):
  """`experiments.cifar --dataset=cifar10`'s path on a machine without the data
  or TensorFlow: fit loads by name, which downloads (from the local server),
  checks the hash, decodes, and the run trains."""
  from jdl import train
  from jdl.config import TrainConfig
  archive, _, _ = cifar10_archive(per_batch=8)
  pin(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": archive})
  config = TrainConfig(dataset="cifar10", model="mlp", epochs=1, batch_size=8, validation_fraction=0,
                       log_every=1000, workdir=str(tmp_path / "run"))
  with LocalDataServer({"cifar-10-binary.tar.gz": archive}) as server:
    monkeypatch.setenv("JDL_DATA_MIRROR", server.url)
    _, results = train.fit(config, progress=False, log=lambda *a: None)
  assert server.requests == ["cifar-10-binary.tar.gz"]
  assert results["dataset"]["num_train"] == 40 and results["dataset"]["num_test"] == 8
  assert results["epochs_run"] == 1 and 0.0 <= results["test_accuracy"] <= 1.0
  assert "tensorflow" not in __import__("sys").modules  # nothing imported TensorFlow


def test_download_hash_mismatch_keeps_nothing_of_that_file(cache, monkeypatch):
  files, *_ = mnist_files()
  pin(monkeypatch, "mnist", files)
  served = dict(files, **{IDX_NAMES[3]: gzip.compress(idx(np.zeros(10, np.uint8)), mtime=0)})
  with LocalDataServer(served) as server:
    monkeypatch.setenv("JDL_DATA_MIRROR", server.url)
    message = one_line_error(lambda: load_dataset("mnist"))
    assert IDX_NAMES[3] in message and classic.FILES["mnist"][3].sha256 in message
    assert "deleted" in message
    # The three good files stay (verified); the bad one and any temporary file do not.
    assert sorted(os.listdir(cache / "mnist")) == sorted(IDX_NAMES[:3])
    server.files = files  # Fixed upstream: the next load fetches only the missing file.
    server.requests.clear()
    assert load_dataset("mnist").test[1].shape == (10,)
    assert server.requests == [IDX_NAMES[3]]


def test_download_dropped_mid_file_keeps_nothing(cache, monkeypatch):
  files, *_ = mnist_files()
  pin(monkeypatch, "mnist", files)
  with LocalDataServer(files) as server:
    server.truncate[IDX_NAMES[0]] = len(files[IDX_NAMES[0]]) // 2  # Content-Length says more.
    monkeypatch.setenv("JDL_DATA_MIRROR", server.url)
    message = one_line_error(lambda: load_dataset("mnist"))
  assert IDX_NAMES[0] in message and "failed" in message
  assert os.listdir(cache / "mnist") == []


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_unreachable_server_fails_fast_with_one_line(cache, tmp_path, monkeypatch, name):
  monkeypatch.setenv("JDL_DATA_MIRROR", dead_port_url())
  monkeypatch.setitem(classic.DEBIAN_DIRS, "fashion_mnist", str(tmp_path / "no-debian-copy"))
  start = time.time()
  message = one_line_error(lambda: load_dataset(name, data_dir=str(tmp_path / "data")))
  assert time.time() - start < 10  # One refused connection, no retries.
  for part in (f"'{name}'", "network", "--data_dir", "--dataset=shapes",
               *classic.search_dirs(name, str(tmp_path / "data"))):
    assert part in message
  assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion_mnist")


def test_download_off_searches_and_says_so(cache, monkeypatch, tmp_path):
  with LocalDataServer({}) as server:
    monkeypatch.setenv("JDL_DATA_MIRROR", server.url)
    message = one_line_error(lambda: load_dataset("cifar100", download=False))
  assert server.requests == [] and "downloading is off" in message and str(cache) in message


def test_tfds_network_probe_asks_only_a_dead_mirror(monkeypatch):
  asked = []
  monkeypatch.setenv("JDL_DATA_MIRROR", "http://127.0.0.1:9/")
  monkeypatch.setattr(locations, "host_answers", lambda url, **kw: asked.append(url) or False)
  assert tfds_source.network_available("https://www.cs.toronto.edu/") is False
  assert asked == ["http://127.0.0.1:9/"]


# --- Local files: search order, Debian's gzip headers, bad files ---

def test_search_order_and_data_dir_first(cache, monkeypatch, tmp_path):
  files, (train_x, _), _ = mnist_files()
  pin(monkeypatch, "mnist", files)
  data_dir = tmp_path / "data"
  assert classic.search_dirs("mnist", str(data_dir)) == [
      str(data_dir / "mnist"), str(data_dir), str(cache / "mnist")]
  assert classic.search_dirs("fashion_mnist")[-1] == DEBIAN_FASHION
  write(data_dir, files)
  write(cache / "mnist", {n: b"broken" for n in files})  # Would fail if it were read.
  np.testing.assert_array_equal(load_dataset("mnist", data_dir=str(data_dir)).train[0][..., 0],
                                train_x)
  monkeypatch.setenv("HOME", str(tmp_path))  # --data_dir=~/data
  assert load_dataset("mnist", data_dir="~/data").train[0].shape == (20, 28, 28, 1)


def test_other_gzip_header_accepted_by_content_hash_only_where_pinned(cache, monkeypatch, tmp_path):
  files, *_ = mnist_files()
  # Debian's files: same IDX bytes, another gzip header (here another mtime).
  debian = {n: gzip.compress(gzip.decompress(b), mtime=1_000_000) for n, b in files.items()}
  write(tmp_path / "data", debian)
  pin(monkeypatch, "fashion_mnist", files, content=True)
  assert load_dataset("fashion_mnist", data_dir=str(tmp_path / "data")).train[1].shape == (20,)
  pin(monkeypatch, "mnist", files)  # No content hash known: only upstream's .gz passes.
  message = one_line_error(lambda: load_dataset("mnist", data_dir=str(tmp_path / "data")))
  assert "SHA-256" in message and IDX_NAMES[0] in message


def _truncated(files):
  return {IDX_NAMES[0]: files[IDX_NAMES[0]][:len(files[IDX_NAMES[0]]) // 2]}


def _corrupt(files):
  data = bytearray(files[IDX_NAMES[0]])
  data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # zeros in the middle of the deflate stream
  return {IDX_NAMES[0]: bytes(data)}


def _wrong_magic(files):
  return {IDX_NAMES[0]: files[IDX_NAMES[1]]}  # a labels file (0x801) where images (0x803) belong


def _wrong_size(files):
  images = np.zeros((20, 28, 28), np.uint8)
  return {IDX_NAMES[0]: gzip.compress(idx(images)[:-28], mtime=0)}  # header says 20 images


def _wrong_hash(files):
  other_labels = np.full(20, 3, np.uint8)  # a valid IDX file, not the pinned one
  return {IDX_NAMES[1]: gzip.compress(idx(other_labels), mtime=0)}


@pytest.mark.parametrize("damage,expected", [
    (_truncated, "truncated"), (_corrupt, "gzip"), (_wrong_magic, "magic 0x00000803"),
    (_wrong_size, "bytes"), (_wrong_hash, "SHA-256"),
    (lambda files: {IDX_NAMES[0]: b"plain text, not gzip"}, "not valid gzip"),
])
def test_bad_local_file_is_one_line_naming_it(cache, monkeypatch, tmp_path, damage, expected):
  files, *_ = mnist_files()
  pin(monkeypatch, "mnist", files)
  bad = damage(files)
  write(tmp_path / "data", dict(files, **bad))
  message = one_line_error(lambda: load_dataset("mnist", data_dir=str(tmp_path / "data")))
  assert str(tmp_path / "data" / next(iter(bad))) in message
  assert expected in message and "replace it with the original" in message


def test_bad_file_in_cache_says_delete_to_download_again(cache, monkeypatch):
  files, *_ = mnist_files()
  pin(monkeypatch, "mnist", files)
  write(cache / "mnist", dict(files, **_wrong_hash(files)))
  message = one_line_error(lambda: load_dataset("mnist"))
  assert str(cache / "mnist" / IDX_NAMES[1]) in message
  assert "delete it and jdl downloads it again" in message


def test_cifar100_fine_labels_and_bad_archives(cache, monkeypatch, tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
  fine, coarse = np.array([99, 0, 57, 3, 42, 7], np.uint8), np.array([19, 0, 1, 2, 3, 4], np.uint8)
  records = np.concatenate([coarse[:, None], fine[:, None], images.reshape(6, -1)], axis=1)
  members = {"train.bin": records[:4].tobytes(), "test.bin": records[4:].tobytes(),
             "fine_label_names.txt": "".join(f"f{i}\n" for i in range(100)).encode(),
             "coarse_label_names.txt": "".join(f"c{i}\n" for i in range(20)).encode()}
  archive = cifar_archive("cifar-100-binary", members)
  pin(monkeypatch, "cifar100", {"cifar-100-binary.tar.gz": archive})
  path = tmp_path / "data" / "cifar-100-binary.tar.gz"
  write(path.parent, {path.name: archive})
  ds = load_dataset("cifar100", data_dir=str(tmp_path / "data"))
  assert ds.num_classes == 100 and ds.class_names[99] == "f99"
  np.testing.assert_array_equal(ds.train[1], fine[:4])
  np.testing.assert_array_equal(ds.test[0], images[4:].transpose(0, 2, 3, 1))

  bad_archives = {
      "truncated": archive[:len(archive) // 2],
      "no member": cifar_archive("cifar-100-binary", {k: v for k, v in members.items()
                                                      if k != "test.bin"}),
      "records": cifar_archive("cifar-100-binary", dict(members, **{"test.bin": b"x" * 100})),
      "hash": cifar_archive("cifar-100-binary",
                            dict(members, **{"test.bin": records[:2].tobytes()})),
  }
  expected = {"truncated": ".tar.gz", "no member": "cifar-100-binary/test.bin",
              "records": "3074-byte records", "hash": "SHA-256"}
  for kind, data in bad_archives.items():
    write(path.parent, {path.name: data})
    message = one_line_error(lambda: load_dataset("cifar100", data_dir=str(tmp_path / "data")))
    assert str(path) in message and expected[kind] in message, (kind, message)


# --- The real Fashion-MNIST from Debian's dataset-fashion-mnist ---

@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
  """The real Fashion-MNIST, read from Debian's copy (an empty cache before it)."""
  if not os.path.isdir(DEBIAN_FASHION):
    message = (f"{DEBIAN_FASHION} is missing: apt-get install dataset-fashion-mnist "
               "(.ci/run installs it)")
    if os.environ.get("CI"):
      pytest.fail(message + "; CI must run the real-data tests")
    pytest.skip(message)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JDL_DATA_CACHE", str(tmp_path_factory.mktemp("empty-cache")))
    return load_dataset("fashion_mnist")


def test_real_fashion_mnist_sizes_labels_and_pixels(fashion):
  (train_x, train_y), (test_x, test_y) = fashion.train, fashion.test
  assert train_x.shape == (60_000, 28, 28, 1) and test_x.shape == (10_000, 28, 28, 1)
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
  assert np.bincount(train_y).tolist() == [6000] * 10
  assert np.bincount(test_y).tolist() == [1000] * 10
  # Read off the files once with the authors' utils/mnist_reader.py.
  assert train_y[:12].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9]
  assert test_y[:12].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5]
  assert int(train_x.sum(dtype=np.int64)) == 3_431_114_169
  assert int(test_x.sum(dtype=np.int64)) == 573_469_082
  np.testing.assert_allclose([train_x.mean() / 255, (train_x / 255).std()], [0.28604, 0.35302],
                             atol=1e-4)  # the published normalisation constants
  np.testing.assert_allclose([test_x.mean() / 255, (test_x / 255).std()], [0.28685, 0.35244],
                             atol=1e-4)
  assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"


def test_real_fashion_mnist_short_training_run(fashion, tmp_path):
  """mlp, 10,000 images, 1 epoch: 81.3% with seed 0 (78.7-81.3% over seeds 0-3)."""
  import jdl
  dataset = dataclasses.replace(fashion, train=tuple(a[:10_000] for a in fashion.train))
  config = jdl.config.TrainConfig(dataset="fashion_mnist", model="mlp", epochs=1,
                                  num_train=10_000, workdir=str(tmp_path / "w"), log_every=1000)
  _, results = jdl.train.fit(config, dataset, progress=False, log=lambda *a: None)
  assert results["test_accuracy"] >= 0.77, results["test_accuracy"]


# --- Every model takes 28x28x1 images ---

@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_runs_on_mnist_shaped_images(name):
  model = build_model(name)

  def forward(x):
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    return model.apply(variables, x)

  logits, features = jax.eval_shape(forward, jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32))
  assert logits.shape == (2, 10)
  for path, leaf in jax.tree_util.tree_leaves_with_path(features):
    assert 0 not in leaf.shape, (name, jax.tree_util.keystr(path), leaf.shape)
