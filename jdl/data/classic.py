"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 from their canonical files, without TensorFlow.

    dataset = load('fashion_mnist')  # uint8 (60000, 28, 28, 1), int32 labels

The files are the ones the dataset authors publish: four gzipped IDX files for
the MNISTs, the *binary* CIFAR archives (never the Python-pickle versions). They
are looked for, in order, in
  1. --data_dir/<name>, then --data_dir itself (`~` expanded);
  2. jdl's data cache, $JDL_DATA_CACHE/<name> (default ~/.cache/jdl/data/<name>);
  3. for fashion_mnist, Debian's copy in /usr/share/datasets/fashion-mnist
     (`apt-get install dataset-fashion-mnist`).
The first directory that has every file is read. Only when none has them, and
downloading is allowed and the host answers within seconds, are the files
downloaded into the cache with pooch (temporary file, SHA-256 check, rename),
with a progress bar when stderr is a terminal.

Every file is checked against the SHA-256 pinned below (from tensorflow-datasets'
url_checksums). Debian's Fashion-MNIST .gz files carry other gzip headers than
upstream's, so a .gz is also accepted when its decompressed bytes match the
pinned content hash. A file that is truncated, not gzip/tar, not IDX, of the
wrong size or with the wrong hash is a one-line `DataError` naming the file.

$JDL_DATA_MIRROR (e.g. http://127.0.0.1:8000/) replaces the directory of every
download URL: the file names stay, so a mirror is a flat directory of the
upstream files. The tests use it to download from a local server.
"""
import dataclasses
import gzip
import hashlib
import os
import re
import sys
import tarfile
import urllib.parse
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from jdl.data import Dataset, locations
from jdl.errors import DataError


@dataclasses.dataclass(frozen=True)
class Remote:
  """One distribution file as published.

  Arguments:
    name: the file name, the same upstream, in the cache and in --data_dir.
    url: where upstream serves it.
    size: bytes as downloaded.
    sha256: hex SHA-256 of the file as downloaded.
    content_sha256: hex SHA-256 of the decompressed bytes of a .gz, when known.
  """
  name: str
  url: str
  size: int
  sha256: str
  content_sha256: Optional[str] = None


_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

# IDX datasets list train images, train labels, test images, test labels in this order.
FILES: Dict[str, Tuple[Remote, ...]] = {
    "mnist": (
        Remote("train-images-idx3-ubyte.gz", _MNIST_URL + "train-images-idx3-ubyte.gz", 9912422,
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        Remote("train-labels-idx1-ubyte.gz", _MNIST_URL + "train-labels-idx1-ubyte.gz", 28881,
               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        Remote("t10k-images-idx3-ubyte.gz", _MNIST_URL + "t10k-images-idx3-ubyte.gz", 1648877,
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        Remote("t10k-labels-idx1-ubyte.gz", _MNIST_URL + "t10k-labels-idx1-ubyte.gz", 4542,
               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
    "fashion_mnist": (
        Remote("train-images-idx3-ubyte.gz", _FASHION_URL + "train-images-idx3-ubyte.gz", 26421880,
               "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
               "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        Remote("train-labels-idx1-ubyte.gz", _FASHION_URL + "train-labels-idx1-ubyte.gz", 29515,
               "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
               "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        Remote("t10k-images-idx3-ubyte.gz", _FASHION_URL + "t10k-images-idx3-ubyte.gz", 4422102,
               "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
               "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        Remote("t10k-labels-idx1-ubyte.gz", _FASHION_URL + "t10k-labels-idx1-ubyte.gz", 5148,
               "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
               "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
    "cifar10": (
        Remote("cifar-10-binary.tar.gz", _CIFAR_URL + "cifar-10-binary.tar.gz", 170052171,
               "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    ),
    "cifar100": (
        Remote("cifar-100-binary.tar.gz", _CIFAR_URL + "cifar-100-binary.tar.gz", 168513733,
               "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
    ),
}
DATASETS = tuple(FILES)
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
CLASS_NAMES = {  # The CIFARs' names come from their archives.
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}
DEBIAN_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
  folder: str  # the archive's top directory
  train: Tuple[str, ...]  # member files, in order
  test: Tuple[str, ...]
  names: str  # one class name per line
  label_bytes: int  # per record, before the 3072 image bytes; the last is the label used


_CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-bin",
                            tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                            ("test_batch.bin",), "batches.meta.txt", 1),
    # Records are (coarse label, fine label, image); jdl uses the 100 fine classes.
    "cifar100": _CifarLayout("cifar-100-binary", ("train.bin",), ("test.bin",),
                             "fine_label_names.txt", 2),
}
_IMAGE_BYTES = 3 * 32 * 32  # one CIFAR image: red, green, blue 32x32 planes (CHW)
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # uint8 data (0x08) with 3 dims (images) or 1 (labels)


def load(name: str, *, data_dir: Optional[str] = None, download: bool = True) -> Dataset:
  """Loads one of `DATASETS` whole into memory, downloading it once if needed.

  Arguments:
    name: 'mnist', 'fashion_mnist', 'cifar10' or 'cifar100'.
    data_dir: searched first, as data_dir/<name> and data_dir (see the module doc).
    download: allow downloading into the cache when no directory has the files.
  Returns:
    A `Dataset` of uint8 (N, 28, 28, 1) or (N, 32, 32, 3) images and int32 labels.
  """
  if name not in FILES:
    raise DataError(f"unknown classic dataset {name!r}; known: {', '.join(DATASETS)}")
  dirs = search_dirs(name, data_dir)
  found = [d for d in dirs if all(os.path.isfile(os.path.join(d, r.name)) for r in FILES[name])]
  if found:
    directory = found[0]
  else:
    directory = os.path.join(locations.cache_dir(), name)
    if not download:
      raise _not_found(name, dirs, "downloading is off")
    _download(name, directory, dirs)
  paths = [os.path.join(directory, r.name) for r in FILES[name]]
  if name in _CIFAR:
    return _load_cifar(name, paths[0])
  train = _load_idx_pair(name, paths[0], paths[1])
  test = _load_idx_pair(name, paths[2], paths[3])
  return Dataset(name, train, test, NUM_CLASSES[name], CLASS_NAMES[name])


def search_dirs(name: str, data_dir: Optional[str] = None) -> List[str]:
  """The directories `load` looks in for `name`'s files, in order.

  Arguments:
    name: one of `DATASETS`.
    data_dir: the --data_dir flag, or None.
  """
  dirs = []
  if data_dir:
    data_dir = os.path.expanduser(data_dir)
    dirs += [os.path.join(data_dir, name), data_dir]
  dirs.append(os.path.join(locations.cache_dir(), name))
  if name in DEBIAN_DIRS:
    dirs.append(DEBIAN_DIRS[name])
  return dirs


def download_url(remote: Remote) -> str:
  """Where `remote` is downloaded from: $JDL_DATA_MIRROR/<name>, or its upstream URL."""
  mirror = locations.mirror()
  return f"{mirror.rstrip('/')}/{remote.name}" if mirror else remote.url


# --- Download ---

def _not_found(name: str, dirs: List[str], reason: str) -> DataError:
  ways = (["install Debian's copy: apt-get install dataset-fashion-mnist"]
          if name in DEBIAN_DIRS else [])
  ways += [f"put {', '.join(r.name for r in FILES[name])} in --data_dir",
           "run offline with --dataset=shapes"]
  return DataError(f"dataset {name!r} is in none of {', '.join(dirs)} and {reason}; "
                   + ", or ".join(ways))


def _one_line(error: BaseException, limit: int = 200) -> str:
  """The innermost message of a (requests) exception chain, on one line, at most `limit` chars."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # requests wraps urllib3's error, which says what happened
  message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  text = " ".join(message.split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def _download(name: str, directory: str, dirs: List[str]) -> None:
  """Downloads `name`'s missing files into `directory` (the cache), hash-checked.

  pooch writes each file to a temporary name in `directory` and renames it only
  after its SHA-256 matched, so an interrupted or wrong download leaves nothing
  that the next `load` would read. Files already there are checked when read.
  """
  remotes = [r for r in FILES[name] if not os.path.isfile(os.path.join(directory, r.name))]
  first_url = download_url(remotes[0])
  if not locations.host_answers(first_url):
    host = urllib.parse.urlparse(first_url).netloc
    raise _not_found(name, dirs, f"the network is unreachable ({host} does not answer), "
                                 "so it cannot be downloaded")
  import pooch  # Only needed to download.
  import requests
  megabytes = sum(r.size for r in remotes) / 1e6
  print(f"Downloading {name} ({megabytes:.0f} MB) into {directory} (once) ...", file=sys.stderr)
  for remote in remotes:
    url = download_url(remote)
    try:
      pooch.retrieve(url, known_hash=f"sha256:{remote.sha256}", fname=remote.name,
                     path=directory, progressbar=sys.stderr.isatty())
    except requests.exceptions.RequestException as e:  # Refused, dropped, HTTP error, timeout.
      raise DataError(f"downloading {url} failed ({_one_line(e)}); the partial file was deleted, "
                      f"nothing of it is in {directory}; run again to retry, or put "
                      f"{remote.name} in --data_dir") from None
    except ValueError as e:  # pooch's hash mismatch; it deleted the download.
      got = re.search(r"but got (\w+)", str(e))
      raise DataError(f"downloaded {url} has SHA-256 {got.group(1) if got else '?'}, expected "
                      f"{remote.sha256}; it was deleted, nothing of it is in {directory}; run "
                      f"again to retry, or put {remote.name} in --data_dir") from None
    except OSError as e:  # The cache cannot be written (permissions, disk full).
      raise DataError(f"cannot download {remote.name} into {directory} ({_one_line(e)}); "
                      "set JDL_DATA_CACHE to a writable directory or use --data_dir") from None


# --- Checks shared by both formats ---

def _bad_file(path: str, problem: str, expected: str) -> DataError:
  """A one-line error about a local file: what is wrong, what was expected, what to do."""
  if os.path.abspath(path).startswith(os.path.abspath(locations.cache_dir())):
    todo = "delete it and jdl downloads it again"
  elif any(path.startswith(d) for d in DEBIAN_DIRS.values()):
    todo = "reinstall it: apt-get install --reinstall dataset-fashion-mnist"
  else:
    todo = "delete it or replace it with the original file"
  return DataError(f"{path} {problem}, expected {expected}; {todo}")


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise _bad_file(path, f"cannot be read ({_one_line(e)})", "a readable file") from None


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):  # 4 MiB at a time
      digest.update(chunk)
  return digest.hexdigest()


def _check_hash(path: str, remote: Remote, digest: str, content: Optional[bytes] = None) -> None:
  """Accepts the upstream file's hash, or (for a .gz) that of its decompressed bytes."""
  if digest == remote.sha256:
    return
  if remote.content_sha256 and content is not None:
    if hashlib.sha256(content).hexdigest() == remote.content_sha256:
      return
    expected = (f"SHA-256 {remote.sha256} (upstream's .gz) or decompressed bytes with SHA-256 "
                f"{remote.content_sha256}")
  else:
    expected = f"SHA-256 {remote.sha256} (upstream's {remote.name})"
  raise _bad_file(path, f"has SHA-256 {digest}", expected)


# --- IDX (MNIST, Fashion-MNIST) ---

def _read_idx(path: str, remote: Remote, ndim: int) -> np.ndarray:
  """Decompresses, parses and hash-checks one gzipped IDX file of uint8 data.

  IDX layout: magic (0, 0, dtype 0x08 = uint8, ndim), then ndim big-endian
  uint32 sizes, then the data in C order.
  """
  data = _read_bytes(path)
  try:
    content = gzip.decompress(data)
  except EOFError:
    raise _bad_file(path, "is truncated (its gzip stream ends early)",
                    "a complete .gz file") from None
  except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise _bad_file(path, f"is not valid gzip ({_one_line(e)})", "a gzipped IDX file") from None
  magic, header = _IDX_MAGIC[ndim], 4 + 4 * ndim
  if len(content) < header or int.from_bytes(content[:4], "big") != magic:
    raise _bad_file(path, f"is not an IDX file of {ndim}-d uint8 data "
                    f"(magic 0x{content[:4].hex()})", f"magic 0x{magic:08x}")
  shape = tuple(int(d) for d in np.frombuffer(content, ">u4", count=ndim, offset=4))
  size = header + int(np.prod(shape))
  if len(content) != size:
    raise _bad_file(path, f"decompresses to {len(content):,} bytes", f"{size:,} for the shape "
                    f"{shape} in its header")
  _check_hash(path, remote, hashlib.sha256(data).hexdigest(), content)
  return np.frombuffer(content, np.uint8, offset=header).reshape(shape)


def _load_idx_pair(name: str, images_path: str, labels_path: str) -> Tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 28, 28, 1), labels int32 (N,)) from two IDX files."""
  remotes = {r.name: r for r in FILES[name]}
  images = _read_idx(images_path, remotes[os.path.basename(images_path)], 3)
  labels = _read_idx(labels_path, remotes[os.path.basename(labels_path)], 1)
  if images.shape[1:] != (28, 28):
    raise _bad_file(images_path, f"holds {images.shape[1]}x{images.shape[2]} images", "28x28")
  if len(images) != len(labels):
    raise _bad_file(labels_path, f"has {len(labels):,} labels but {images_path} has "
                    f"{len(images):,} images", "one label per image")
  if labels.max(initial=0) >= NUM_CLASSES[name]:
    raise _bad_file(labels_path, f"has label {labels.max()}", f"labels below {NUM_CLASSES[name]}")
  return images[..., None].copy(), labels.astype(np.int32)  # copy: writable, frees the bytes


# --- CIFAR binary archives ---

def _load_cifar(name: str, path: str) -> Dataset:
  """Reads the train/test records and class names from a CIFAR binary .tar.gz.

  The archive is streamed once and only the expected members are read into
  memory; nothing is extracted to disk.
  """
  layout = _CIFAR[name]
  record = layout.label_bytes + _IMAGE_BYTES
  wanted = {f"{layout.folder}/{m}": None for m in (*layout.train, *layout.test, layout.names)}
  try:
    with tarfile.open(path, mode="r|gz") as tar:
      for member in tar:
        if member.name in wanted and member.isfile():
          wanted[member.name] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise _bad_file(path, f"cannot be read as a .tar.gz ({_one_line(e)})",
                    f"the complete {FILES[name][0].name}") from None
  missing = [m for m, data in wanted.items() if data is None]
  if missing:
    raise _bad_file(path, f"has no member {missing[0]}", f"the {FILES[name][0].name} archive")

  def split(members):
    rows = np.concatenate([_cifar_records(path, m, wanted[f"{layout.folder}/{m}"], record)
                           for m in members])  # (N, record) uint8
    labels = rows[:, layout.label_bytes - 1].astype(np.int32)
    if labels.max(initial=0) >= NUM_CLASSES[name]:
      raise _bad_file(path, f"has label {labels.max()}", f"labels below {NUM_CLASSES[name]}")
    images = rows[:, layout.label_bytes:].reshape(-1, 3, 32, 32)  # red, green, blue planes
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels  # (N, 32, 32, 3)

  text = wanted[f"{layout.folder}/{layout.names}"].decode("utf-8", "replace")
  class_names = tuple(line.strip() for line in text.splitlines() if line.strip())
  if len(class_names) != NUM_CLASSES[name]:
    raise _bad_file(path, f"has {len(class_names)} class names in {layout.names}",
                    f"{NUM_CLASSES[name]}")
  train, test = split(layout.train), split(layout.test)
  _check_hash(path, FILES[name][0], _sha256_file(path))  # Last, after the more telling checks.
  return Dataset(name, train, test, NUM_CLASSES[name], class_names)


def _cifar_records(path: str, member: str, data: bytes, record: int) -> np.ndarray:
  """One member's bytes as (N, record) uint8 rows: label byte(s), then the CHW image."""
  if not data or len(data) % record:
    raise _bad_file(path, f"has a member {member} of {len(data):,} bytes",
                    f"a whole number of {record}-byte records")
  return np.frombuffer(data, np.uint8).reshape(-1, record)
