"""MNIST: loading the original IDX files and the paper's non-IID client split.

The loader reads the four original ``.gz`` files and checks their SHA-256, so
every experiment provably runs on the published data. When no folder is named
and the files are in none of the data roots (see ``paths``), they are
downloaded once into the cache (``$ENSEMBLE_FL_DATA`` or
``~/.cache/ensemble_fl``) from public mirrors of the original files, each
verified against the same SHA-256 before it is kept.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import zlib
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from ensemble_fl._arrays import as_array
from ensemble_fl.clients import ClientData, check_features
from ensemble_fl.data import download as download_lib
from ensemble_fl.data import paths

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# SHA-256 of the published .gz files (see shared/data/README.md).
SHA256 = {
    TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

SIZES = {TRAIN_IMAGES: 9_912_422, TRAIN_LABELS: 28_881, TEST_IMAGES: 1_648_877,
         TEST_LABELS: 4_542}
NUM_CLASSES = 10

# Public copies of the four original files (byte-identical: the SHA-256 above
# decides), tried in this order:
# - Google's CVDF bucket, the source tensorflow_datasets downloads MNIST from;
# - PyTorch's ossci-datasets S3 bucket, torchvision's MNIST mirror;
# - the original host, last: it has often refused scripted downloads.
MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# Base URL(s) to use instead (whitespace-separated); the file names are appended.
URL_ENV = "ENSEMBLE_FL_MNIST_URL"

IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension

_CORRUPT_FIX = ("Delete it and run again to download a fresh copy (or put the original there); "
                "in Python, load_mnist(..., verify=False) loads it anyway.")


def parse_idx(raw: bytes, *, expected_magic: int, name: str = "IDX data") -> np.ndarray:
  """Parses an uncompressed IDX byte string of unsigned bytes.

  Args:
    raw: the decompressed file content.
    expected_magic: 2051 for images, 2049 for labels.
    name: used in error messages.

  Returns:
    uint8 array of the shape given in the header, e.g. ``[n, 28, 28]`` or
    ``[n]`` (a read-only view of ``raw``).

  Raises:
    ValueError: short header, wrong magic number, or a payload whose length
      differs from the product of the header's dimensions.
  """
  if not isinstance(raw, (bytes, bytearray, memoryview)):
    raise TypeError(f"raw must be bytes, got {type(raw).__name__}")
  if isinstance(expected_magic, bool) or not isinstance(expected_magic, (int, np.integer)):
    raise TypeError(f"expected_magic must be an integer, got {expected_magic!r}")
  raw = bytes(raw)
  if len(raw) < 4:
    raise ValueError(f"{name}: {len(raw)} bytes is too short for an IDX header")
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    raise ValueError(f"{name}: IDX magic number is {magic}, expected {expected_magic}")
  ndim = magic & 0xFF
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise ValueError(f"{name}: {len(raw)} bytes is too short for a {ndim}-d IDX header")
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  payload = len(raw) - header_len
  expected = math.prod(dims)  # Python ints: 3 dims of up to 2**32 overflow int64
  if payload != expected:
    raise ValueError(
        f"{name}: header says dims {dims} ({expected} bytes of data), "
        f"but the payload has {payload} bytes")
  return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_gz(path: Path, verify: bool) -> bytes:
  blob = download_lib.read_bytes(path)
  if verify:
    download_lib.check_sha256(path, blob, SHA256[path.name], _CORRUPT_FIX)
  try:
    return gzip.decompress(blob)
  except (OSError, EOFError, zlib.error) as err:
    raise ValueError(f"{path}: not a valid gzip file ({err})") from err


def _load_split(folder: Path, images_name: str, labels_name: str, verify: bool):
  images = parse_idx(_read_gz(folder / images_name, verify),
                     expected_magic=IMAGES_MAGIC, name=images_name)
  labels = parse_idx(_read_gz(folder / labels_name, verify),
                     expected_magic=LABELS_MAGIC, name=labels_name)
  if images.shape[1:] != (28, 28):
    raise ValueError(f"{images_name}: images are {images.shape[1:]}, expected (28, 28)")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
        f"{images_name} has {images.shape[0]} images but {labels_name} has "
        f"{labels.shape[0]} labels")
  if labels.size and labels.max() > 9:
    raise ValueError(f"{labels_name}: label {int(labels.max())} outside 0..9")
  return _convert(images, labels)


def _convert(images: np.ndarray, labels: np.ndarray):
  """uint8 ``[n, 28, 28(, 1)]`` and integer ``[n]`` -> float32 ``[n,28,28,1]`` in [0,1], int32."""
  x = (np.asarray(images, dtype=np.float32) / np.float32(255.0)).reshape(-1, 28, 28, 1)
  return x, np.asarray(labels, dtype=np.int32).reshape(-1)


def _offline_hint(folder: Path) -> str:
  return (f"Offline: copy the four original files ({', '.join(FILES)}; SHA-256 in the "
          f"README) into {folder}, or set ${URL_ENV} to a mirror that has them.")


def fetch_mnist(
    root: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    stream: TextIO | None = None,
) -> Path:
  """Downloads the MNIST files missing from ``<root>/mnist``; returns that folder.

  Each file is fetched from the first mirror that gives a copy with the
  published SHA-256 (see ``download.fetch``); files already there are left
  alone (``load_mnist`` verifies them).

  Args:
    root: data root to fill; None = ``paths.cache_dir()``.
    mirrors: base URLs, the file names are appended; None = ``$ENSEMBLE_FL_MNIST_URL``
      (whitespace-separated) when set, else :data:`MIRRORS`.
    stream: where progress goes (default stderr).

  Raises:
    download.DownloadError: a file could be had from no mirror (one line).
    ValueError: the folder cannot be written.
  """
  folder = (paths.cache_dir() if root is None else paths.expand(root, "root")) / "mnist"
  bases = list(mirrors) if mirrors is not None else download_lib.base_urls(URL_ENV, MIRRORS)
  for name in FILES:
    if not (folder / name).is_file():
      download_lib.fetch([download_lib.join_url(b, name) for b in bases], folder / name,
                         sha256=SHA256[name], size=SIZES[name],
                         offline_hint=_offline_hint(folder), stream=stream)
  return folder


def load_mnist(data_dir: str | os.PathLike | None = None, *, verify: bool = True,
               download: bool = True):
  """Loads MNIST from the four original IDX ``.gz`` files.

  Args:
    data_dir: the folder holding the four files, or a data root holding
      ``mnist/``; searched alone, never downloaded into. None: the default data
      roots (see ``paths``), and if the files are in none of them, a download
      into the cache (:func:`fetch_mnist`).
    verify: check each file's SHA-256 against the published value. With
      ``verify=False`` any well-formed IDX files are accepted (any counts),
      which is what small test fixtures need.
    download: allow the download (only when ``data_dir`` is None).

  Returns:
    ``(x_train, y_train, x_test, y_test)``: float32 ``[60000, 28, 28, 1]`` with
    pixels / 255 in [0, 1], int32 ``[60000]`` digits 0..9, float32
    ``[10000, 28, 28, 1]``, int32 ``[10000]``.

  Raises:
    FileNotFoundError: the files are nowhere to be found and cannot be
      downloaded (the message says where it looked or which URLs failed, and
      how to put the files in place by hand).
    ValueError: a checksum mismatch (naming the file), a malformed or
      unreadable file.
  """
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(f"data_dir must be a path or None, got {type(data_dir).__name__}")
  try:
    folder = paths.resolve_dir(
        data_dir, "mnist", required=FILES,
        hint="Fix: name the folder holding the four original MNIST .gz files (or its "
             "parent holding mnist/), or name no folder to download them into the cache.")
  except FileNotFoundError:
    if data_dir is not None or not download:
      raise
    folder = fetch_mnist()
  return (*_load_split(folder, TRAIN_IMAGES, TRAIN_LABELS, verify),
          *_load_split(folder, TEST_IMAGES, TEST_LABELS, verify))


def assign_mnist_clients(
    y: np.ndarray,
    *,
    n_clients: int = 1000,
    q: float = 0.5,
    num_groups: int = 10,
    seed: int = 0,
) -> np.ndarray:
  """The paper's non-IID assignment of training examples to clients.

  Clients ``g * c .. (g + 1) * c - 1`` form group ``g``, with
  ``c = n_clients // num_groups``. An example of label ``l`` goes to group
  ``l mod num_groups`` with probability ``q`` and to each other group with
  probability ``(1 - q) / (num_groups - 1)``; inside its group it goes to a
  client uniformly at random. ``q = 1 / num_groups`` is IID.

  Every client gets at least one example: after the random draw, each client
  left empty receives one example taken from the *same group* (so group
  proportions are unchanged), chosen uniformly among the examples whose client
  holds two or more, i.e. donors are picked in proportion to their surplus.
  With the paper's sizes (60 examples per client on average) this almost never
  triggers; it matters only for very many clients.

  Args:
    y: integer labels ``[m]``, digits in ``[0, 10)``.
    n_clients: number of clients, a positive multiple of ``num_groups``.
    q: non-IID degree in [0, 1].
    num_groups: number of groups (>= 1; with 1 group ``q`` has no effect).
    seed: seed of the numpy Generator; the result is a function of all args.

  Returns:
    int32 ``[m]``: the client of each example, each in ``[0, n_clients)``.

  Raises:
    ValueError: bad arguments, or a group received fewer examples than it has
      clients (use fewer clients).
  """
  y = as_array("y", y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y must be a 1-d integer array, got {y.dtype} {y.shape}")
  if y.size and y.min() < 0:
    raise ValueError("y: labels must be non-negative")
  if y.size and y.max() > np.iinfo(np.int32).max:
    raise ValueError("y: labels must fit in int32")
  if y.size and y.max() >= NUM_CLASSES:
    raise ValueError(f"y: labels outside [0, {NUM_CLASSES}) (MNIST digits), max {y.max()}")
  if isinstance(q, (bool, np.bool_)) or not (
      isinstance(q, (int, float, np.floating, np.integer)) and 0.0 <= q <= 1.0):
    raise ValueError(f"q must be a number in [0, 1], got {q!r}")
  num_groups = _positive_int("num_groups", num_groups)
  n_clients = _positive_int("n_clients", n_clients)
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if n_clients % num_groups:
    raise ValueError(
        f"n_clients={n_clients} must be a multiple of num_groups={num_groups} "
        "(the groups have equal size)")
  if y.size < n_clients:
    raise ValueError(f"{y.size} examples cannot give {n_clients} clients one each")
  per_group = n_clients // num_groups
  rng = np.random.default_rng(seed)
  m = y.shape[0]

  home = (y % num_groups).astype(np.int64)
  if num_groups == 1:
    group = home
  else:
    stay = rng.random(m) < q
    # Adding a shift in 1..G-1 modulo G lands uniformly on the other groups.
    shift = rng.integers(1, num_groups, size=m)
    group = np.where(stay, home, (home + shift) % num_groups)
  client = group * per_group + rng.integers(0, per_group, size=m)

  counts = np.bincount(client, minlength=n_clients)
  if np.any(counts == 0):
    client = _fill_empty_clients(client, group, counts, per_group, num_groups, rng)
  return client.astype(np.int32)


def _positive_int(name: str, value) -> int:
  """``value`` as an int >= 1 (integral floats such as 10.0 allowed)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or \
      not math.isfinite(value) or int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _rank_within_client(client: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """int64 ``[m]``: position of each example among its client's, in index order."""
  order = np.argsort(client, kind="stable")
  starts = np.cumsum(counts) - counts
  rank = np.empty(client.shape[0], dtype=np.int64)
  rank[order] = np.arange(order.size) - np.repeat(starts, counts)
  return rank


def _fill_empty_clients(client, group, counts, per_group, num_groups, rng):
  """Moves one surplus example of the same group into every empty client."""
  client = client.copy()
  # Every client keeps its first example; the others are surplus it can spare.
  surplus = _rank_within_client(client, counts) >= 1
  for g in range(num_groups):
    lo = g * per_group
    empty = lo + np.flatnonzero(counts[lo: lo + per_group] == 0)
    if empty.size == 0:
      continue
    donors = np.flatnonzero(surplus & (group == g))
    if donors.size < empty.size:
      raise ValueError(
          f"group {g} received {int(np.sum(group == g))} examples for {per_group} "
          "clients; use fewer clients so each can get at least one example")
    client[rng.choice(donors, size=empty.size, replace=False)] = empty
  return client


def split_mnist_clients(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_clients: int = 1000,
    q: float = 0.5,
    num_groups: int = 10,
    seed: int = 0,
) -> ClientData:
  """Splits training data into the paper's non-IID clients.

  See :func:`assign_mnist_clients` for the distribution and the at-least-one
  example guarantee. Each client's examples keep their original order.

  Args:
    x: float ``[m, *feature_shape]``, e.g. ``[60000, 28, 28, 1]``.
    y: integer labels ``[m]``, digits in ``[0, 10)``.
    n_clients, q, num_groups, seed: as in :func:`assign_mnist_clients`.

  Returns:
    :class:`ClientData` with ``x`` float32 ``[n_clients, m_max, *feature_shape]``,
    ``y`` int32 ``[n_clients, m_max]``, ``sizes`` int32 ``[n_clients]`` (all >= 1).
  """
  x = as_array("x", x)
  y = as_array("y", y)
  if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f"x has shape {x.shape} but y has shape {y.shape}")
  check_features("x", x)
  client = assign_mnist_clients(y, n_clients=n_clients, q=q, num_groups=num_groups, seed=seed)
  counts = np.bincount(client, minlength=n_clients)
  rank = _rank_within_client(client, counts)
  # One scatter instead of per-client slices: the same layout as
  # clients.pack_clients without a second full copy of x (MNIST x is 188 MB).
  x_out = np.zeros((n_clients, int(counts.max()), *x.shape[1:]), dtype=np.float32)
  y_out = np.zeros((n_clients, int(counts.max())), dtype=np.int32)
  x_out[client, rank] = x
  y_out[client, rank] = y
  return ClientData(x_out, y_out, counts.astype(np.int32))
