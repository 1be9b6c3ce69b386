"""Array conversion shared by the modules that validate their inputs."""

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
