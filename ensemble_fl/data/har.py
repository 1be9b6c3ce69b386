"""Human activity recognition: UCI HAR features or HAPT raw-signal windows.

The paper's HAR experiment uses the 561 UCI HAR features with one client per
volunteer. Offline those feature matrices are missing (shared/data/README.md),
so the default source is the HAPT raw signals of the same 30 volunteers, cut
into HAR's windows (128 samples = 2.56 s at 50 Hz, 50 % overlap) and turned into
features by the simplest map an MLP can use: per-channel standardisation with
training statistics, then flattening, 128 x 6 = 768 features.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ensemble_fl._arrays import as_array
from ensemble_fl.clients import ClientData, check_features, pack_clients
from ensemble_fl.data.paths import resolve_dir

NUM_CLASSES = 6
NUM_UCI_FEATURES = 561
WINDOW = 128
STRIDE = 64
ACTIVITY_NAMES = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS",
                  "SITTING", "STANDING", "LAYING")
HAPT_FILE = "hapt_raw.npz"
HAPT_KEYS = ("signals", "label", "user", "experiment")
UCI_FOLDER = "UCI HAR Dataset"


class HarData(NamedTuple):
  """Federated HAR data: training clients plus a pooled, tagged test set.

  Attributes:
    clients: :class:`ClientData`, one client per volunteer, ``x`` float32
      ``[30, m_max, F]``, ``y`` int32 labels 0..5.
    x_test: float32 ``[d, F]``, standardised with the training statistics.
    y_test: int32 ``[d]`` in 0..5.
    test_client: int32 ``[d]``, the client (volunteer index 0..n-1) each test
      example belongs to.
    info: dict with ``source``, ``user_ids`` (int32 ``[n]``, volunteer id of
      each client), ``mean``/``std`` (the standardisation), ``num_classes``,
      ``activity_names``, ``feature_dim``.
  """

  clients: ClientData
  x_test: np.ndarray
  y_test: np.ndarray
  test_client: np.ndarray
  info: dict | None = None


# ----------------------------------------------------------------- UCI HAR


def _read_table(path: Path, *, columns: int | None, dtype) -> np.ndarray:
  if not path.is_file():
    raise FileNotFoundError(f"missing UCI HAR file: {path}")
  try:
    table = np.loadtxt(path, dtype=dtype, ndmin=2)
  except ValueError as err:
    raise ValueError(f"{path}: not a whitespace-separated numeric table ({err})") from err
  if columns is not None and table.shape[1] != columns:
    raise ValueError(f"{path}: {table.shape[1]} columns, expected {columns}")
  return table


def load_uci_har(folder: str | os.PathLike):
  """Loads the official "UCI HAR Dataset" folder, train and test pooled.

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
      1..6 or subjects outside 1..30.
  """
  if not isinstance(folder, (str, os.PathLike)):
    raise TypeError(f"folder must be a path, got {type(folder).__name__}")
  folder = Path(folder).expanduser()
  if not (folder / "train").is_dir() and (folder / UCI_FOLDER / "train").is_dir():
    folder = folder / UCI_FOLDER
  xs, ys, users = [], [], []
  for split in ("train", "test"):
    x = _read_table(folder / split / f"X_{split}.txt", columns=NUM_UCI_FEATURES,
                    dtype=np.float64)
    y = _read_table(folder / split / f"y_{split}.txt", columns=1, dtype=np.int64)[:, 0]
    s = _read_table(folder / split / f"subject_{split}.txt", columns=1, dtype=np.int64)[:, 0]
    if not (x.shape[0] == y.shape[0] == s.shape[0]):
      raise ValueError(
          f"{folder / split}: X has {x.shape[0]} rows, y {y.shape[0]}, subject {s.shape[0]}")
    if y.size and (y.min() < 1 or y.max() > NUM_CLASSES):
      raise ValueError(f"{folder / split}: activity labels must be in 1..6")
    if s.size and (s.min() < 1 or s.max() > 30):
      raise ValueError(f"{folder / split}: subject ids must be in 1..30")
    check_features(f"{folder / split}: X", x)
    xs.append(x)
    ys.append(y)
    users.append(s)
  return (np.concatenate(xs).astype(np.float32),
          (np.concatenate(ys) - 1).astype(np.int32),
          np.concatenate(users).astype(np.int32))


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
  if path is not None and Path(path).expanduser().is_file():
    return Path(path).expanduser()
  folder = resolve_dir(
      path, "hapt", required=(HAPT_FILE,),
      hint="Fix: pass the path of hapt_raw.npz (or its folder, or the data root), "
           "or set $ENSEMBLE_FL_DATA.")
  return folder / HAPT_FILE


def load_hapt(path: str | os.PathLike | None = None):
  """Loads the HAPT raw signals and cuts them into HAR windows.

  Args:
    path: ``hapt_raw.npz`` itself, the folder holding it, a data root holding
      ``hapt/``, or None for the default data root.

  Returns:
    ``(windows, y, user)``: float32 ``[M, 128, 6]`` (acc x/y/z in g, gyro
    x/y/z in rad/s), int32 ``[M]`` activity 0..5, int32 ``[M]`` volunteer
    1..30. M = 10,017 for the shipped file. See :func:`window_signals`.

  Raises:
    FileNotFoundError: the file is not found (message lists where it looked).
    ValueError: missing keys or malformed arrays.
  """
  if path is not None and not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a path or None, got {type(path).__name__}")
  file = _hapt_file(path)
  with np.load(file, allow_pickle=False) as data:
    missing = [k for k in HAPT_KEYS if k not in data.files]
    if missing:
      raise ValueError(f"{file}: missing keys {missing} (has {data.files})")
    arrays = {k: data[k] for k in HAPT_KEYS}
  return window_signals(arrays["signals"], arrays["label"], arrays["user"],
                        arrays["experiment"])


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


def har_federated(
    source: str | os.PathLike = "hapt",
    *,
    data_dir: str | os.PathLike | None = None,
    train_fraction: float = 0.75,
    seed: int = 0,
) -> HarData:
  """The paper's federated HAR setup: one client per volunteer.

  Each volunteer's examples are split at random into ``train_fraction`` for
  training and the rest for testing (not UCI's own split by subject). Clients
  are numbered 0..n-1 in increasing volunteer id. Features are standardised
  with statistics of the pooled training examples (a fixed preprocessing
  constant, as the paper's pre-normalised UCI features are).

  Args:
    source: ``"hapt"`` (default; HAPT windows -> 768 features) or the path of
      a ``UCI HAR Dataset`` folder (561 features).
    data_dir: for ``"hapt"``, where to find ``hapt_raw.npz`` (see
      :func:`load_hapt`); None = default data root.
    train_fraction: per-user fraction of training examples, in (0, 1].
    seed: seed of the per-user splits.

  Returns:
    :class:`HarData`.
  """
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"source must be 'hapt' or a UCI HAR folder path, got {source!r}")
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(f"data_dir must be a path or None, got {type(data_dir).__name__}")
  _check_train_fraction(train_fraction)
  _check_seed(seed)
  if isinstance(source, str) and source == "hapt":
    x, y, user = load_hapt(data_dir)
    is_train = split_per_user(user, train_fraction=train_fraction, seed=seed)
    mean, std = fit_standardizer(x[is_train], axis=(0, 1))
    feats = window_features(x, mean, std)
    name = "hapt"
  else:
    x, y, user = load_uci_har(source)
    is_train = split_per_user(user, train_fraction=train_fraction, seed=seed)
    mean, std = fit_standardizer(x[is_train], axis=0)
    feats = ((x - mean) / std).astype(np.float32)
    name = str(source)

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
      "user_ids": user_ids.astype(np.int32),
      "mean": mean,
      "std": std,
      "num_classes": NUM_CLASSES,
      "activity_names": ACTIVITY_NAMES,
      "feature_dim": int(feats.shape[1]),
  }
  return HarData(clients, feats[test], y[test].astype(np.int32), client_of[test], info)
