"""Human activity recognition: UCI HAR features or HAPT raw-signal windows.

The paper's HAR experiment uses the 561 UCI HAR features ("Human Activity
Recognition Using Smartphones", UCI data set 240) with one client per
volunteer. Three sources (``har_federated``'s ``source``):

* ``"uci"``: the real UCI HAR data. Found locally (a data root's ``har/``
  holding the converted ``uci_har.npz``, the extracted ``UCI HAR Dataset``
  folder, or the archive), else downloaded once from the UCI repository into
  the cache, checked (pinned archive SHA-256, then structure: 7,352 + 2,947
  rows x 561 features, labels 1..6, subjects 1..30, pinned label/subject
  digest), converted to ``har/uci_har.npz`` and the SHA-256 of its matrices
  recorded in ``har/uci_har.json``, which every later load checks.
* ``"hapt"``: the offline stand-in. The HAPT raw signals of the same 30
  volunteers, cut into HAR's windows (128 samples = 2.56 s at 50 Hz, 50 %
  overlap) and turned into features by the simplest map an MLP can use:
  per-channel standardisation with training statistics, then flattening,
  128 x 6 = 768 features. The file is checked against its pinned SHA-256.
* ``"auto"``: UCI HAR when it is already on disk (no network), else HAPT when
  it is, else UCI HAR downloaded. :func:`resolve_source` says which.

Any of them is then split the paper's way: each volunteer's pooled examples
75 % / 25 % into training and test.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Collection, NamedTuple, Sequence, TextIO

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ensemble_fl._arrays import as_array
from ensemble_fl.clients import ClientData, check_features, pack_clients
from ensemble_fl.data import download as download_lib
from ensemble_fl.data import paths

NUM_CLASSES = 6
NUM_UCI_FEATURES = 561
NUM_SUBJECTS = 30
WINDOW = 128
STRIDE = 64
ACTIVITY_NAMES = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS",
                  "SITTING", "STANDING", "LAYING")
SOURCES = ("auto", "uci", "hapt")

HAPT_FILE = "hapt_raw.npz"
HAPT_KEYS = ("signals", "label", "user", "experiment")
# SHA-256 of the published hapt_raw.npz (shared/data/SHA256SUMS).
HAPT_SHA256 = "792338ca0db87db7a5b6b8d74a685076b31337fd7dbf5a4565518e7cef4e2952"
# HAPT's per-sample ids: -1 unlabelled, 1..6 basic activities, 7..12 transitions.
HAPT_LABELS = (-1, *range(1, 13))

UCI_FOLDER = "UCI HAR Dataset"
UCI_NPZ = "uci_har.npz"
UCI_DIGESTS = "uci_har.json"
UCI_URL_ENV = "ENSEMBLE_FL_HAR_URL"
# UCI's download of data set 240 (an outer zip holding "UCI HAR Dataset.zip"),
# then the repository's older direct link to that nested zip.
UCI_MIRRORS = (
    "https://archive.ics.uci.edu/static/public/240/human+activity+recognition+using+smartphones.zip",
    "https://archive.ics.uci.edu/ml/machine-learning-databases/00240/UCI%20HAR%20Dataset.zip",
)
# SHA-256 of those two files (61,005,872 and 60,999,314 bytes), as pinned by
# many independent users of the data set (not measured here: this code was
# written without internet access); either one is accepted.
UCI_ARCHIVE_SHA256 = (
    "c00b803081a5c797cd5e4b83700a9810b38d53d9d84e01917e090e1fdbc81031",
    "2045e435c955214b38145fb5fa00776c72814f01b203fec405152dac7d5bfeb0",
)
# Names under which a copied archive is picked up from a har/ folder.
UCI_ARCHIVE_NAMES = ("human+activity+recognition+using+smartphones.zip", "UCI HAR Dataset.zip")
_DOWNLOAD_NAME = "uci_har_download.zip"
_UCI_KEYS = ("x_train", "y_train", "subject_train", "x_test", "y_test", "subject_test")


class UciExpected(NamedTuple):
  """What a UCI HAR copy must look like (the defaults describe the real one).

  Attributes:
    n_train, n_test: rows of UCI's train and test parts.
    labels_sha256: SHA-256 of the activity and subject ids as int8, in the
      order y_train, y_test, subject_train, subject_test (values 1-based, as
      in the files), or None for no content check (small test fixtures).
  """

  n_train: int = 7352
  n_test: int = 2947
  labels_sha256: str | None = "dcad2e688555fbcfcb0b2a7d8f9f8c0dd440403218fb94fd2ad070aaad5d738b"


UCI_EXPECTED = UciExpected()


class HarData(NamedTuple):
  """Federated HAR data: training clients plus a pooled, tagged test set.

  Attributes:
    clients: :class:`ClientData`, one client per volunteer, ``x`` float32
      ``[30, m_max, F]``, ``y`` int32 labels 0..5.
    x_test: float32 ``[d, F]``, standardised with the training statistics.
    y_test: int32 ``[d]`` in 0..5.
    test_client: int32 ``[d]``, the client (volunteer index 0..n-1) each test
      example belongs to.
    info: dict with ``source`` ("uci", "hapt" or the folder given),
      ``origin`` (the file or folder read), ``user_ids`` (int32 ``[n]``,
      volunteer id of each client), ``mean``/``std`` (the standardisation),
      ``num_classes``, ``activity_names``, ``feature_dim``.
  """

  clients: ClientData
  x_test: np.ndarray
  y_test: np.ndarray
  test_client: np.ndarray
  info: dict | None = None


# ------------------------------------------------------------ file reading


def _load_npz(path: Path, keys: Sequence[str], *, sha256: str | None = None,
              fix: str = "") -> dict[str, np.ndarray]:
  """The arrays ``keys`` of an ``.npz`` file, with one-line errors.

  Args:
    path: the file.
    keys: names that must be present.
    sha256: when given, the file's pinned SHA-256 (checked first).
    fix: what to do about a checksum mismatch (appended to that message).

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable, damaged, not an ``.npz`` archive (e.g. text or
      pickled data), a checksum mismatch, or missing keys; each names the file.
  """
  blob = download_lib.read_bytes(path)
  if sha256 is not None:
    download_lib.check_sha256(path, blob, sha256, fix)
  try:
    data = np.load(io.BytesIO(blob), allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
      raise ValueError("a single .npy array, not an .npz archive")
    with data:
      missing = [k for k in keys if k not in data.files]
      if missing:
        raise KeyError(f"missing keys {missing} (has {data.files})")
      return {k: data[k] for k in keys}
  except KeyError as err:
    raise ValueError(f"{path}: {err.args[0]}") from err
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
    reason = download_lib.one_line(err) or type(err).__name__
    if "pickled" in reason:
      reason = "not a numpy .npz archive"
    raise ValueError(f"{path}: not a readable .npz file ({reason})") from err


# ----------------------------------------------------------------- UCI HAR


def _read_table(source: Path | bytes, name: str, *, columns: int, dtype) -> np.ndarray:
  """A whitespace-separated numeric table ``[rows, columns]`` from a file or bytes."""
  try:
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    table = np.loadtxt(stream, dtype=dtype, ndmin=2)
  except (ValueError, UnicodeDecodeError) as err:
    raise ValueError(f"{name}: not a whitespace-separated numeric table "
                     f"({download_lib.one_line(err)})") from err
  except FileNotFoundError as err:
    raise FileNotFoundError(f"missing UCI HAR file: {name}") from err
  except OSError as err:  # PermissionError, I/O errors
    raise ValueError(f"{name}: cannot read the file ({err.strerror or err})") from err
  if table.size and table.shape[1] != columns:
    raise ValueError(f"{name}: {table.shape[1]} columns, expected {columns}")
  return table.reshape(-1, columns)


def _uci_member(split: str, kind: str) -> str:
  """``train/X_train.txt``-style path of one UCI HAR file inside its folder."""
  return f"{split}/{kind}_{split}.txt"


def _parse_uci(read: Callable[[str], Path | bytes], where: str) -> dict[str, np.ndarray]:
  """UCI HAR's six arrays, read through ``read(member)``, original values.

  Returns:
    dict with ``x_train`` float32 ``[n, 561]``, ``y_train`` int8 (1..6),
    ``subject_train`` int8 (1..30) and the same for ``test``.

  Raises:
    ValueError: malformed tables, mismatched row counts, values out of range.
  """
  arrays = {}
  for split in ("train", "test"):
    x = _read_table(read(_uci_member(split, "X")), f"{where}/{_uci_member(split, 'X')}",
                    columns=NUM_UCI_FEATURES, dtype=np.float64)
    y = _read_table(read(_uci_member(split, "y")), f"{where}/{_uci_member(split, 'y')}",
                    columns=1, dtype=np.int64)[:, 0]
    s = _read_table(read(_uci_member(split, "subject")),
                    f"{where}/{_uci_member(split, 'subject')}", columns=1, dtype=np.int64)[:, 0]
    if not x.shape[0] == y.shape[0] == s.shape[0]:
      raise ValueError(
          f"{where}/{split}: X has {x.shape[0]} rows, y {y.shape[0]}, subject {s.shape[0]}")
    if y.size and (y.min() < 1 or y.max() > NUM_CLASSES):
      raise ValueError(f"{where}/{split}: activity labels must be in 1..6")
    if s.size and (s.min() < 1 or s.max() > NUM_SUBJECTS):
      raise ValueError(f"{where}/{split}: subject ids must be in 1..30")
    check_features(f"{where}/{split}: X", x)
    arrays[f"x_{split}"] = x.astype(np.float32)
    arrays[f"y_{split}"] = y.astype(np.int8)
    arrays[f"subject_{split}"] = s.astype(np.int8)
  return arrays


def _labels_digest(arrays: dict[str, np.ndarray]) -> str:
  keys = ("y_train", "y_test", "subject_train", "subject_test")
  return download_lib.sha256_hex(b"".join(
      np.ascontiguousarray(arrays[k], dtype=np.int8).tobytes() for k in keys))


def _array_digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
  return {k: download_lib.sha256_hex(np.ascontiguousarray(arrays[k]).tobytes())
          for k in _UCI_KEYS}


def check_uci_har(arrays: dict[str, np.ndarray], where: str,
                  expected: UciExpected | None = None) -> None:
  """Checks a UCI HAR copy by its structure (and, for the real one, content).

  Args:
    arrays: as returned by the UCI readers (``x_train`` ``[n, 561]`` float32,
      ``y_*``/``subject_*`` 1-based ids).
    where: named in the messages.
    expected: row counts and label digest; None = the real data set's.

  Raises:
    ValueError: wrong shapes or row counts, non-finite features, ids out of
      range, a subject in both parts, or a label/subject digest mismatch.
  """
  expected = UCI_EXPECTED if expected is None else expected
  for split, n in (("train", expected.n_train), ("test", expected.n_test)):
    x, y, s = (arrays[f"{k}_{split}"] for k in ("x", "y", "subject"))
    if x.shape != (n, NUM_UCI_FEATURES) or y.shape != (n,) or s.shape != (n,):
      raise ValueError(f"{where}: {split} part has X {x.shape}, y {y.shape}, subject "
                       f"{s.shape}; UCI HAR has {n} rows x {NUM_UCI_FEATURES} features")
    if n and (y.min() < 1 or y.max() > NUM_CLASSES or s.min() < 1 or s.max() > NUM_SUBJECTS):
      raise ValueError(f"{where}: {split} labels must be in 1..6 and subjects in 1..30")
    check_features(f"{where}: X_{split}", x)
  shared = np.intersect1d(arrays["subject_train"], arrays["subject_test"])
  if shared.size:
    raise ValueError(f"{where}: subjects {shared.tolist()} are in both the train and test part")
  if expected.labels_sha256 is not None and _labels_digest(arrays) != expected.labels_sha256:
    raise ValueError(f"{where}: the activity labels and subject ids differ from UCI HAR's")


def _read_uci_folder(folder: Path) -> dict[str, np.ndarray]:
  """The six arrays of an extracted ``UCI HAR Dataset`` folder."""
  return _parse_uci(lambda member: folder / member, str(folder))


def _uci_folder_of(folder: Path) -> Path | None:
  """``folder`` or ``folder/UCI HAR Dataset`` when it holds ``train/X_train.txt``."""
  for candidate in (folder, folder / UCI_FOLDER):
    if (candidate / _uci_member("train", "X")).is_file():
      return candidate
  return None


def load_uci_har(folder: str | os.PathLike):
  """Loads an extracted "UCI HAR Dataset" folder, train and test pooled.

  Any row counts are accepted (see :func:`get_uci_har` for the checked real
  data set).

  Args:
    folder: the ``UCI HAR Dataset`` folder (holding ``train/X_train.txt``,
      ``train/y_train.txt``, ``train/subject_train.txt`` and the same for
      ``test``), or its parent.

  Returns:
    ``(x, y, user)``: float32 ``[M, 561]``, int32 ``[M]`` activity 0..5
    (the file's 1..6 minus one), int32 ``[M]`` volunteer id 1..30; train rows
    first, then test rows (M = 10,299 for the full data set).

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: wrong column count, mismatched row counts, labels outside
      1..6 or subjects outside 1..30, an unreadable file.
  """
  if not isinstance(folder, (str, os.PathLike)):
    raise TypeError(f"folder must be a path, got {type(folder).__name__}")
  folder = paths.expand(folder, "folder")
  return _pool(_read_uci_folder(_uci_folder_of(folder) or folder))


def _pool(arrays: dict[str, np.ndarray]):
  """UCI's train and test parts pooled: float32 x, int32 labels 0..5, int32 users."""
  return (np.concatenate([arrays["x_train"], arrays["x_test"]]).astype(np.float32),
          (np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int32) - 1),
          np.concatenate([arrays["subject_train"], arrays["subject_test"]]).astype(np.int32))


def _read_uci_archive(archive: Path, blob: bytes | None = None) -> dict[str, np.ndarray]:
  """The six arrays of a UCI HAR zip: UCI's outer zip or the nested one.

  Only the six needed members are read (nothing is extracted to disk, so no
  member name can escape the folder).

  Args:
    archive: the zip file (named in messages).
    blob: its content when already read; None = read ``archive``.

  Raises:
    ValueError: not a zip, a damaged one, or one without the UCI HAR files.
  """
  try:
    with zipfile.ZipFile(io.BytesIO(blob) if blob is not None else archive) as outer:
      nested = [n for n in outer.namelist()
                if n.rsplit("/", 1)[-1] == "UCI HAR Dataset.zip" and not n.startswith("__MACOSX")]
      inner = zipfile.ZipFile(io.BytesIO(outer.read(nested[0]))) if nested else outer
      with inner:
        names = [n for n in inner.namelist() if not n.startswith("__MACOSX")]

        def read(member: str) -> bytes:
          hits = [n for n in names if n == member or n.endswith("/" + member)]
          if not hits:
            raise ValueError(f"no {member} in the archive")
          return inner.read(min(hits, key=len))
        return _parse_uci(read, f"{archive}!{UCI_FOLDER}")
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
    raise ValueError(f"{archive}: not a readable zip archive "
                     f"({download_lib.one_line(err) or type(err).__name__})") from err


def _write_uci_npz(folder: Path, arrays: dict[str, np.ndarray], origin: str) -> Path:
  """Writes ``uci_har.npz`` and the digests of its matrices (``uci_har.json``).

  Both go to temporary names first and are renamed into place, the npz
  before the json, so a crash never leaves a json describing other data.
  """
  npz, record = folder / UCI_NPZ, folder / UCI_DIGESTS
  temporary = []
  try:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{UCI_NPZ}.", suffix=".part")
    temporary.append(name)
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **{k: arrays[k] for k in _UCI_KEYS})
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{UCI_DIGESTS}.", suffix=".part")
    temporary.append(name)
    with os.fdopen(fd, "w") as f:
      json.dump({"sha256": _array_digests(arrays), "origin": origin}, f, indent=1)
    os.replace(temporary[0], npz)
    os.replace(temporary[1], record)
  except OSError as err:
    raise ValueError(f"cannot write the UCI HAR data into {folder} "
                     f"({err.strerror or err}); set $ENSEMBLE_FL_DATA to a writable folder") from err
  finally:
    for name in temporary:  # after os.replace the name is gone: a no-op
      Path(name).unlink(missing_ok=True)
  return npz


def _load_uci_npz(npz: Path, expected: UciExpected) -> dict[str, np.ndarray]:
  """``uci_har.npz``, checked against the digests recorded beside it.

  A copy without ``uci_har.json`` (copied in by hand) is checked by structure
  and its digests are recorded, when the folder is writable.
  """
  arrays = _load_npz(npz, _UCI_KEYS)
  record = npz.with_name(UCI_DIGESTS)
  fix = f"Delete {npz.name} and {record.name} to download UCI HAR again."
  if record.is_file():
    try:
      recorded = json.loads(download_lib.read_bytes(record))["sha256"]
    except (ValueError, KeyError, TypeError) as err:
      raise ValueError(f"{record}: not a digest record ({download_lib.one_line(err)}). {fix}") from err
    changed = [k for k, v in _array_digests(arrays).items() if recorded.get(k) != v]
    if changed:
      raise ValueError(f"{npz}: {', '.join(changed)} differ from the SHA-256 recorded in "
                       f"{record.name} when the data were first verified. {fix}")
  check_uci_har(arrays, str(npz), expected)
  if not record.is_file():
    try:
      record.write_text(json.dumps({"sha256": _array_digests(arrays), "origin": str(npz)}))
    except OSError:
      pass  # a read-only data root: this copy stays checked by its structure alone
  return arrays


def _find_uci(data_dir: str | os.PathLike | None) -> Path | None:
  """The first local UCI HAR copy: ``uci_har.npz``, an extracted folder, or an archive.

  Looked for in ``data_dir`` and ``data_dir/har`` (default: every data root
  of ``paths.candidate_data_dirs()``, the cache included). No network.
  """
  roots = ([paths.expand(data_dir, "data_dir")] if data_dir is not None
           else paths.candidate_data_dirs())
  for root in roots:
    for folder in (root, root / "har"):
      if (folder / UCI_NPZ).is_file():
        return folder / UCI_NPZ
      extracted = _uci_folder_of(folder)
      if extracted is not None:
        return extracted
      for name in UCI_ARCHIVE_NAMES:
        if (folder / name).is_file():
          return folder / name
  return None


def _uci_offline_hint(folder: Path) -> str:
  return (f"Offline: copy UCI's archive ({UCI_ARCHIVE_NAMES[0]} or {UCI_ARCHIVE_NAMES[1]}) or "
          f"the extracted '{UCI_FOLDER}' folder into {folder}, or set ${UCI_URL_ENV} to a "
          "mirror; or run on the HAPT stand-in (source 'hapt').")


def fetch_uci_har(
    root: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    archive_sha256: str | Collection[str] | None = None,
    expected: UciExpected | None = None,
    stream: TextIO | None = None,
) -> Path:
  """Downloads UCI HAR into ``<root>/har/uci_har.npz`` (+ its digest record).

  The archive must have a pinned SHA-256 and pass :func:`check_uci_har`
  before anything is kept; it is deleted once converted.

  Args:
    root: data root; None = ``paths.cache_dir()``.
    mirrors: archive URLs; None = ``$ENSEMBLE_FL_HAR_URL`` (whitespace-separated)
      when set, else :data:`UCI_MIRRORS`.
    archive_sha256: accepted archive digests; None = :data:`UCI_ARCHIVE_SHA256`;
      ``()`` = none (the structure check alone).
    expected: the structure to check; None = the real data set's.
    stream: where progress goes (default stderr).

  Returns:
    The path of ``uci_har.npz``.

  Raises:
    download.DownloadError: no mirror gave a verified archive (one line).
    ValueError: the folder cannot be written.
  """
  folder = (paths.cache_dir() if root is None else paths.expand(root, "root")) / "har"
  urls = list(mirrors) if mirrors is not None else download_lib.base_urls(UCI_URL_ENV, UCI_MIRRORS)
  accepted = UCI_ARCHIVE_SHA256 if archive_sha256 is None else archive_sha256
  verified = []

  def validate(path: Path) -> None:  # parse once, keep the arrays for the npz
    arrays = _read_uci_archive(path)
    check_uci_har(arrays, "the archive", expected)
    verified.append(arrays)

  archive = download_lib.fetch(urls, folder / _DOWNLOAD_NAME, sha256=accepted,
                               validate=validate, offline_hint=_uci_offline_hint(folder),
                               what="the UCI HAR archive", stream=stream)
  try:
    return _write_uci_npz(folder, verified[-1], origin="downloaded")
  finally:
    archive.unlink(missing_ok=True)


def get_uci_har(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                expected: UciExpected | None = None):
  """The real UCI HAR data set, train and test pooled, verified.

  Looks for a local copy first (:func:`_find_uci`; no network); with none and
  no ``data_dir``, downloads it into the cache (:func:`fetch_uci_har`). An
  archive copied into a ``har/`` folder by hand is checked against the pinned
  SHA-256 and converted next to itself.

  Args:
    data_dir: a folder to search alone (never downloaded into); None = the
      default data roots, then the download.
    download: allow the download.
    expected: the structure to check; None = the real data set's.

  Returns:
    ``(x, y, user, origin)``: float32 ``[M, 561]``, int32 ``[M]`` activity
    0..5, int32 ``[M]`` volunteer 1..30 (train rows first, M = 10,299), and
    the file or folder it came from.

  Raises:
    FileNotFoundError: no copy and no download (one line on how to get one).
    ValueError: a copy that fails its checks.
  """
  expected = UCI_EXPECTED if expected is None else expected
  found = _find_uci(data_dir)
  if found is None:
    if data_dir is not None or not download:
      where = paths.expand(data_dir, "data_dir") if data_dir is not None else paths.cache_dir()
      raise FileNotFoundError(
          f"no UCI HAR data ({UCI_NPZ}, a '{UCI_FOLDER}' folder or UCI's archive) in {where} "
          f"or {where / 'har'}. " + _uci_offline_hint(where / "har"))
    found = fetch_uci_har(expected=expected)
  if found.name == UCI_NPZ:
    arrays = _load_uci_npz(found, expected)
  elif found.is_dir():
    arrays = _read_uci_folder(found)
    check_uci_har(arrays, str(found), expected)
  else:  # an archive copied in by hand
    blob = download_lib.read_bytes(found)
    digest = download_lib.sha256_hex(blob)
    if digest not in UCI_ARCHIVE_SHA256:
      raise ValueError(f"{found}: SHA-256 {digest} is not that of UCI's archive "
                       f"({' or '.join(UCI_ARCHIVE_SHA256)}); replace it with the original, "
                       "or delete it to download UCI HAR.")
    arrays = _read_uci_archive(found, blob)
    check_uci_har(arrays, str(found), expected)
    _write_uci_npz(found.parent, arrays, origin=str(found))
  return (*_pool(arrays), str(found))


# -------------------------------------------------------------------- HAPT


def window_signals(
    signals: np.ndarray,
    label: np.ndarray,
    user: np.ndarray,
    experiment: np.ndarray,
    *,
    window: int = WINDOW,
    stride: int = STRIDE,
):
  """Cuts recordings into fixed windows that carry one basic activity.

  Each experiment (a contiguous run of rows) is cut into windows starting at
  its first row and every ``stride`` rows after; windows never cross an
  experiment boundary, and a tail shorter than ``window`` is dropped. A
  window is kept iff all its ``window`` labels are the same activity in 1..6
  (transitions 7..12 and unlabelled -1 rows are discarded).

  Args:
    signals: float ``[T, C]``, rows in time order within each experiment.
    label: integer ``[T]`` per-sample activity id.
    user: integer ``[T]`` volunteer id, constant within an experiment.
    experiment: integer ``[T]`` session id; each id occupies one contiguous run.
    window, stride: window length and step, in samples.

  Returns:
    ``(windows, y, user)``: float32 ``[M, window, C]``, int32 ``[M]``
    activity 0..5, int32 ``[M]`` volunteer id; windows in row order.

  Raises:
    ValueError: mismatched lengths, an experiment split over several runs or
      spanning several users, non-finite signals, bad window/stride.
  """
  signals = as_array("signals", signals)
  label, user, experiment = (as_array(name, a) for name, a in (
      ("label", label), ("user", user), ("experiment", experiment)))
  if signals.ndim != 2:
    raise ValueError(f"signals must be [T, C], got shape {signals.shape}")
  t = signals.shape[0]
  for name, a in (("label", label), ("user", user), ("experiment", experiment)):
    if a.shape != (t,):
      raise ValueError(f"{name} has shape {a.shape}, expected ({t},)")
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{name} must be integers, got {a.dtype}")
  for name, v in (("window", window), ("stride", stride)):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"window and stride must be positive integers, got {name}={v!r}")
  window, stride = int(window), int(stride)
  check_features("signals", signals)

  # Runs of constant experiment id; a repeated id means shuffled rows.
  run_start = np.flatnonzero(np.r_[True, experiment[1:] != experiment[:-1]]) if t else \
      np.zeros(0, np.int64)
  run_ids = experiment[run_start]
  if np.unique(run_ids).size != run_ids.size:
    raise ValueError("rows of one experiment must be contiguous")
  user_breaks = np.flatnonzero(user[1:] != user[:-1]) + 1
  if not np.all(np.isin(user_breaks, run_start)):
    raise ValueError("an experiment spans several users")

  run_len = np.diff(np.r_[run_start, t])
  n_win = np.maximum(0, (run_len - window) // stride + 1)
  # Start of window j of run r is run_start[r] + j * stride, built without a loop.
  first = np.repeat(np.cumsum(n_win) - n_win, n_win)
  starts = np.repeat(run_start, n_win) + (np.arange(n_win.sum()) - first) * stride
  c = signals.shape[1]
  if starts.size == 0:
    return (np.zeros((0, window, c), np.float32), np.zeros(0, np.int32),
            np.zeros(0, np.int32))

  lab = sliding_window_view(label, window)[starts]  # [W, window], a view gather
  keep = np.all(lab == lab[:, :1], axis=1) & (lab[:, 0] >= 1) & (lab[:, 0] <= NUM_CLASSES)
  starts = starts[keep]
  # sliding_window_view on axis 0 appends the window axis last: [W, C, window].
  win = sliding_window_view(signals, window, axis=0)[starts].transpose(0, 2, 1)
  return (np.ascontiguousarray(win, dtype=np.float32),
          (label[starts] - 1).astype(np.int32),
          user[starts].astype(np.int32))


def _hapt_file(path) -> Path:
  """The HAPT file named by ``path`` (the file, its folder, a data root, or None)."""
  if path is not None:
    file = paths.expand(path, "path")
    if file.is_file():
      return file
  folder = paths.resolve_dir(
      path, "hapt", required=(HAPT_FILE,),
      hint=f"HAPT is the offline stand-in and is not downloaded: copy {HAPT_FILE} (SHA-256 "
           f"{HAPT_SHA256}) into the hapt/ folder of a data root, or use the real UCI HAR data, "
           "which is downloaded (source 'uci').")
  return folder / HAPT_FILE


def _find_hapt(path) -> Path | None:
  try:
    return _hapt_file(path)
  except FileNotFoundError:
    return None


def load_hapt(path: str | os.PathLike | None = None, *, verify: bool = True):
  """Loads the HAPT raw signals and cuts them into HAR windows.

  Args:
    path: ``hapt_raw.npz`` itself, the folder holding it, a data root holding
      ``hapt/``, or None for the default data roots.
    verify: check the file's SHA-256 against the published one; with
      ``verify=False`` any well-formed file is accepted (test fixtures).

  Returns:
    ``(windows, y, user)``: float32 ``[M, 128, 6]`` (acc x/y/z in g, gyro
    x/y/z in rad/s), int32 ``[M]`` activity 0..5, int32 ``[M]`` volunteer
    1..30. M = 10,017 for the shipped file. See :func:`window_signals`.

  Raises:
    FileNotFoundError: the file is not found (message lists where it looked).
    ValueError: an unreadable or damaged file, a checksum mismatch, missing
      keys, malformed arrays, labels that are no HAPT activity id, or no
      window of one basic activity at all; each names the file.
  """
  if path is not None and not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a path or None, got {type(path).__name__}")
  file = _hapt_file(path)
  arrays = _load_npz(
      file, HAPT_KEYS, sha256=HAPT_SHA256 if verify else None,
      fix="Replace it with the original (shared/data/SHA256SUMS); in Python, "
          "load_hapt(..., verify=False) loads it anyway.")
  label = arrays["label"]
  if np.issubdtype(label.dtype, np.integer):
    unknown = np.setdiff1d(label, HAPT_LABELS)
    if unknown.size:
      raise ValueError(f"{file}: label ids {unknown[:5].tolist()} are no HAPT activity "
                       "(expected -1 or 1..12)")
  try:
    windows = window_signals(arrays["signals"], label, arrays["user"], arrays["experiment"])
  except ValueError as err:
    raise ValueError(f"{file}: {err}") from err
  if windows[0].shape[0] == 0:
    raise ValueError(f"{file}: no window of {WINDOW} samples carries a single activity 1..6")
  return windows


# --------------------------------------------------------------- features


def fit_standardizer(x_train: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std of the training data, reduced over ``axis``.

  Args:
    x_train: float ``[M, ...]``.
    axis: axes to reduce, e.g. ``(0, 1)`` for windows ``[M, 128, 6]`` (one
      statistic per channel) or ``0`` for features ``[M, F]``.

  Returns:
    ``(mean, std)`` float32 with ``keepdims`` shapes; a zero std is replaced
    by 1 so constant features map to 0 instead of NaN.
  """
  x = np.asarray(x_train, dtype=np.float64)
  mean = x.mean(axis=axis, keepdims=True)
  std = x.std(axis=axis, keepdims=True)
  std = np.where(std > 0, std, 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


def window_features(windows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """The MLP's features of HAPT windows.

  Args:
    windows: float ``[M, 128, C]``.
    mean, std: float32 ``[1, 1, C]`` from ``fit_standardizer(train, (0, 1))``.

  Returns:
    float32 ``[M, 128 * C]``: per-channel standardised, flattened time-major
    (``[t0c0, t0c1, ..., t1c0, ...]``).
  """
  z = (np.asarray(windows, np.float32) - mean) / std
  return z.reshape(z.shape[0], -1).astype(np.float32)


# -------------------------------------------------------------- federated


def _check_train_fraction(train_fraction) -> None:
  if isinstance(train_fraction, (bool, np.bool_)) or not isinstance(
      train_fraction, (int, float, np.integer, np.floating)) or not 0.0 < train_fraction <= 1.0:
    raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}")


def _check_seed(seed) -> None:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def split_per_user(user: np.ndarray, *, train_fraction: float = 0.75, seed: int = 0):
  """Splits each user's examples at random into train and test.

  User ``u`` with ``m_u`` examples gets ``round(train_fraction * m_u)``
  training examples, at least 1 (every client needs one). Each user has its
  own Generator seeded with ``(seed, u)``, so a user's split does not depend
  on which other users are present.

  Args:
    user: integer ``[M]`` user ids.
    train_fraction: in (0, 1].
    seed: integer seed.

  Returns:
    bool ``[M]``: True for training examples.
  """
  user = as_array("user", user)
  if user.ndim != 1 or not np.issubdtype(user.dtype, np.integer):
    raise ValueError(f"user must be a 1-d integer array, got {user.dtype} {user.shape}")
  if user.size and user.min() < 0:  # (seed, u) seeds a numpy Generator
    raise ValueError(f"user ids must be non-negative, got {user.min()}")
  _check_train_fraction(train_fraction)
  _check_seed(seed)
  is_train = np.zeros(user.shape[0], dtype=bool)
  for u in np.unique(user):  # a loop over users (30), not examples
    idx = np.flatnonzero(user == u)
    n_train = max(1, int(round(train_fraction * idx.size)))
    chosen = np.random.default_rng((int(seed), int(u))).permutation(idx)[:n_train]
    is_train[chosen] = True
  return is_train


def resolve_source(data_dir: str | os.PathLike | None = None,
                   source: str | os.PathLike = "auto") -> str:
  """Which HAR data a run uses, decided without the network.

  Args:
    data_dir: the folder to search (None = the default data roots).
    source: ``"auto"``, ``"uci"``, ``"hapt"`` or the path of an extracted
      ``UCI HAR Dataset`` folder.

  Returns:
    ``"uci"`` or ``"hapt"``, or the path as given. ``"auto"`` gives ``"uci"``
    when a UCI HAR copy is on disk, else ``"hapt"`` when the HAPT file is,
    else ``"uci"`` (the one that can be downloaded) when no folder is named,
    else ``"hapt"``.

  Raises:
    TypeError: ``source`` is neither a name nor a path.
  """
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError("source must be 'hapt' or a UCI HAR folder path (or 'uci', 'auto'), "
                    f"got {source!r}")
  if isinstance(source, os.PathLike) or source not in SOURCES:
    return os.fspath(source)
  if source != "auto":
    return source
  if _find_uci(data_dir) is not None:
    return "uci"
  if _find_hapt(data_dir) is not None or data_dir is not None:
    return "hapt"
  return "uci"


def har_federated(
    source: str | os.PathLike = "auto",
    *,
    data_dir: str | os.PathLike | None = None,
    train_fraction: float = 0.75,
    seed: int = 0,
    verify: bool = True,
    download: bool = True,
) -> HarData:
  """The paper's federated HAR setup: one client per volunteer.

  Each volunteer's examples (UCI's train and test parts pooled) are split at
  random into ``train_fraction`` for training and the rest for testing (not
  UCI's own split by subject). Clients are numbered 0..n-1 in increasing
  volunteer id. Features are standardised with statistics of the pooled
  training examples (a fixed preprocessing constant, as the paper's
  pre-normalised UCI features are).

  Args:
    source: ``"auto"`` (see :func:`resolve_source`), ``"uci"`` (the real UCI
      HAR data, 561 features, downloaded if needed, see :func:`get_uci_har`),
      ``"hapt"`` (HAPT windows -> 768 features), or the path of a
      ``UCI HAR Dataset`` folder (561 features, any row counts).
    data_dir: where to look (for ``"hapt"`` also ``hapt_raw.npz`` itself);
      searched alone and never downloaded into. None = the default data roots.
    train_fraction: per-user fraction of training examples, in (0, 1].
    seed: seed of the per-user splits.
    verify: check the HAPT file's SHA-256 (UCI HAR is always checked).
    download: allow downloading UCI HAR.

  Returns:
    :class:`HarData`; ``info["source"]`` says which data were used.
  """
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(f"data_dir must be a path or None, got {type(data_dir).__name__}")
  _check_train_fraction(train_fraction)
  _check_seed(seed)
  name = resolve_source(data_dir, source)
  if name == "hapt":
    origin = str(_hapt_file(data_dir))
    x, y, user = load_hapt(data_dir, verify=verify)
    is_train = split_per_user(user, train_fraction=train_fraction, seed=seed)
    mean, std = fit_standardizer(x[is_train], axis=(0, 1))
    feats = window_features(x, mean, std)
  else:
    if name == "uci":
      x, y, user, origin = get_uci_har(data_dir, download=download)
    else:
      x, y, user = load_uci_har(name)
      origin = name
    if x.shape[0] == 0:
      raise ValueError(f"{origin}: no examples")
    is_train = split_per_user(user, train_fraction=train_fraction, seed=seed)
    mean, std = fit_standardizer(x[is_train], axis=0)
    feats = ((x - mean) / std).astype(np.float32)

  user_ids, client_of = np.unique(user, return_inverse=True)
  client_of = client_of.astype(np.int32)
  xs, ys = [], []
  for c in range(user_ids.size):
    idx = np.flatnonzero(is_train & (client_of == c))
    xs.append(feats[idx])
    ys.append(y[idx])
  clients = pack_clients(xs, ys, num_classes=NUM_CLASSES)
  test = np.flatnonzero(~is_train)
  info = {
      "source": name,
      "origin": origin,
      "user_ids": user_ids.astype(np.int32),
      "mean": mean,
      "std": std,
      "num_classes": NUM_CLASSES,
      "activity_names": ACTIVITY_NAMES,
      "feature_dim": int(feats.shape[1]),
  }
  return HarData(clients, feats[test], y[test].astype(np.int32), client_of[test], info)
