"""Federated client data in one padded, vmap-friendly layout.

Clients hold different numbers of examples. To train every client of a
subsample in one compiled program (``vmap`` over clients, no Python loop), all
clients are padded to a common length ``m_max`` and carry their true size.
Minibatches are then gathered *by index* from a client's first ``sizes[i]``
rows, so padding is never read and no model ever copies the data.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from ensemble_fl._arrays import as_array


class ClientData(NamedTuple):
  """All n clients' training data, padded to a common length.

  Attributes:
    x: float32 ``[n, m_max, *feature_shape]``; rows ``>= sizes[i]`` are zero.
    y: int32 ``[n, m_max]``; rows ``>= sizes[i]`` are zero.
    sizes: int32 ``[n]``, the number of real examples of each client (>= 1).
  """

  x: np.ndarray
  y: np.ndarray
  sizes: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.sizes.shape[0])

  @property
  def feature_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[2:])


def pack_clients(
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    *,
    num_classes: int | None = None,
) -> ClientData:
  """Pads per-client arrays into one :class:`ClientData`.

  Args:
    xs: one float array ``[m_i, *feature_shape]`` per client.
    ys: one integer array ``[m_i]`` per client.
    num_classes: when given, labels must lie in ``[0, num_classes)``.

  Returns:
    The padded :class:`ClientData`.

  Raises:
    ValueError: no clients, a client without examples, mismatched lengths or
      feature shapes, non-finite features, non-integer or out-of-range labels.
  """
  for name, seq in (("xs", xs), ("ys", ys)):
    if isinstance(seq, (str, bytes, dict)) or not hasattr(seq, "__len__") or (
        hasattr(seq, "shape") and len(seq.shape) == 0):
      raise TypeError(
          f"{name} must be a sequence of per-client arrays, got {type(seq).__name__}")
  num_classes = _check_num_classes(num_classes)
  if len(xs) != len(ys):
    raise ValueError(f"xs has {len(xs)} clients but ys has {len(ys)}")
  if len(xs) == 0:
    raise ValueError("no clients: xs and ys are empty")
  xs = [as_array(f"xs[{i}]", x) for i, x in enumerate(xs)]
  ys = [as_array(f"ys[{i}]", y) for i, y in enumerate(ys)]
  feature_shape = xs[0].shape[1:]
  for i, (x, y) in enumerate(zip(xs, ys)):
    if x.ndim < 1 or x.shape[0] == 0:
      raise ValueError(f"xs[{i}]: client {i} has no examples")
    if x.shape[1:] != feature_shape:
      raise ValueError(
          f"xs[{i}]: client {i} has feature shape {x.shape[1:]}, client 0 has {feature_shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
      raise ValueError(
          f"ys[{i}]: client {i}'s labels have shape {y.shape}, expected ({x.shape[0]},)")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"ys[{i}]: client {i}'s labels must be integers, got {y.dtype}")
    check_features(f"xs[{i}] (client {i}'s features)", x)
    if np.any(y < 0) or np.any(y > _I32_MAX) or (
        num_classes is not None and np.any(y >= num_classes)):
      raise ValueError(
          f"ys[{i}]: client {i}'s labels outside "
          f"[0, {num_classes if num_classes is not None else 2**31 - 1})")
  sizes = np.array([x.shape[0] for x in xs], dtype=np.int32)
  m_max = int(sizes.max())
  n = len(xs)
  x_out = np.zeros((n, m_max, *feature_shape), dtype=np.float32)
  y_out = np.zeros((n, m_max), dtype=np.int32)
  for i, (x, y) in enumerate(zip(xs, ys)):
    x_out[i, : x.shape[0]] = x
    y_out[i, : y.shape[0]] = y
  return ClientData(x_out, y_out, sizes)


def real_labels(y: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """The labels training reads: ``y[i, :sizes[i]]`` of every client, flattened.

  Padding rows (``j >= sizes[i]``) are never read, so their labels do not matter.
  """
  y, sizes = np.asarray(y), np.asarray(sizes)
  return y[np.arange(y.shape[1])[None, :] < sizes[:, None]]


def validate_clients(clients: ClientData, *, num_classes: int | None = None) -> None:
  """Checks a :class:`ClientData` built by hand; raises ValueError on any defect.

  Labels are checked where training reads them (:func:`real_labels`):
  non-negative, and below ``num_classes`` when it is given.
  """
  if not isinstance(clients, tuple) or len(clients) != 3:
    raise TypeError(
        f"clients must be a ClientData(x, y, sizes), got {type(clients).__name__}")
  num_classes = _check_num_classes(num_classes)
  x, y, sizes = (as_array(f"clients.{name}", a)
                 for name, a in zip(("x", "y", "sizes"), clients))
  check_features("clients.x", x)
  if x.ndim < 2:
    raise ValueError(f"clients.x must be [n, m_max, ...], got shape {x.shape}")
  if y.shape != x.shape[:2]:
    raise ValueError(f"clients.y has shape {y.shape}, expected {x.shape[:2]}")
  if sizes.shape != (x.shape[0],):
    raise ValueError(f"clients.sizes has shape {sizes.shape}, expected ({x.shape[0]},)")
  if x.shape[0] == 0:
    raise ValueError("clients has no clients (clients.x has n = 0)")
  if not np.issubdtype(sizes.dtype, np.integer) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError("clients.sizes and clients.y must be integer arrays")
  if np.any(sizes < 1) or np.any(sizes > x.shape[1]):
    bad = int(np.flatnonzero((sizes < 1) | (sizes > x.shape[1]))[0])
    raise ValueError(
        f"clients.sizes: client {bad} has size {int(sizes[bad])}, must be in [1, {x.shape[1]}]")
  labels = real_labels(y, sizes)
  if np.any(labels < 0) or (num_classes is not None and np.any(labels >= num_classes)):
    bound = "non-negative" if num_classes is None else f"in [0, {num_classes})"
    raise ValueError(f"clients.y has labels that are not {bound}: min {int(labels.min())}, "
                     f"max {int(labels.max())}")


_F32_MAX = float(np.finfo(np.float32).max)
_I32_MAX = int(np.iinfo(np.int32).max)


def check_features(name: str, x: np.ndarray) -> None:
  """Raises ValueError unless ``x`` holds real, finite numbers that fit float32.

  Every entry point that takes features (``pack_clients``,
  ``validate_clients``, the data loaders, ``ensemble.predict``) runs this one
  check, so a bad array gets the same message wherever it enters.

  Args:
    name: how the message names ``x`` (e.g. ``"x"``, ``"clients.x"``).
    x: a numpy array of any shape.
  """
  if not _is_real(x.dtype):
    raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf")
  with np.errstate(over="ignore"):  # float128 or huge ints compared in their own dtype
    if np.any(np.abs(x) > _F32_MAX):
      raise ValueError(f"{name} overflows float32")


def _is_real(dtype) -> bool:
  """Integer or floating dtype (not bool, complex, object or strings)."""
  return (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))


def _check_num_classes(num_classes):
  if num_classes is None:
    return None
  if isinstance(num_classes, (bool, np.bool_)) or not isinstance(
      num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  return int(num_classes)
