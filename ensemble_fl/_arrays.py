"""Array conversion and checks shared by the modules that validate their inputs."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_array(name: str, value: Any) -> np.ndarray:
  """np.asarray, with a ragged nested sequence reported under ``name``."""
  try:
    return np.asarray(value)
  except ValueError as e:  # "inhomogeneous shape": a ragged nested list
    raise ValueError(f"{name} is not a rectangular array: {e}") from e


def dtype_of(name: str, value: Any) -> np.dtype:
  """``value.dtype`` when it has one (no copy of a device array or tracer), else NumPy's."""
  dtype = getattr(value, "dtype", None)
  return as_array(name, value).dtype if dtype is None else dtype


def as_scalar(value: Any) -> Any:
  """A 0-d array (a JAX scalar, or NumPy's) as its NumPy scalar; anything else as it is.

  So that a scalar check accepts ``jnp.float32(0.1)`` wherever it accepts
  ``np.float32(0.1)``.
  """
  if getattr(value, "ndim", None) == 0 and hasattr(value, "dtype") and \
      not isinstance(value, np.generic):
    return np.asarray(value)[()]
  return value


def check_subsets(subsets: Any, n: int, num_models: int | None = None) -> np.ndarray:
  """Validates a plan's client subsets: int ``[N, s]``, ids in ``[0, n)``, -1 pads.

  Args:
    subsets: each model's client ids, one row per model.
    n: the number of clients.
    num_models: the N the rows must number (None: any N >= 0).

  Returns:
    int64 ``[N, s]``.

  Raises:
    ValueError: another shape or dtype, an id outside ``[0, n)`` other than
      the -1 pad, or a client listed twice in one row.
  """
  subsets = as_array("subsets", subsets)
  if subsets.ndim != 2 or (num_models is not None and subsets.shape[0] != num_models):
    expected = "N" if num_models is None else f"N={num_models}"
    raise ValueError(f"subsets must be int [{expected}, s] (one row per "
                     f"model), got shape {subsets.shape}")
  if not np.issubdtype(subsets.dtype, np.integer):
    raise ValueError(f"subsets must have an integer dtype, got {subsets.dtype}")
  if subsets.size and (subsets.min() < -1 or subsets.max() >= n):
    raise ValueError(f"subsets must hold client ids in [0, n={n}) and -1 "
                     f"pads, found values in [{subsets.min()}, {subsets.max()}]")
  ordered = np.sort(subsets, axis=1)
  if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
    raise ValueError("subsets has a client listed twice in one model's row")
  return subsets.astype(np.int64)
