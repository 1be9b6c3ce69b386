"""Crash-safe storage of finished ensemble chunks.

A paper-scale ensemble trains for hours. :class:`ChunkStore` writes each
finished chunk of models to a run directory *atomically* (write to a temporary
file in the same directory, fsync, then ``os.replace``), so a run killed at any
instant leaves only whole chunks behind, and a restart with the same command
skips them. The run directory carries a fingerprint of everything that
determines the models (training config, subsample plan, data, model shapes,
chunk size); a restart whose fingerprint differs is refused rather than
silently mixing models from two configurations.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

_MANIFEST = "manifest.json"
_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.npz$")


def array_digest(*arrays: Any) -> str:
  """SHA-256 over the dtypes, shapes and bytes of numpy-convertible arrays."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _canonical(obj: Any) -> Any:
  """Makes a fingerprint JSON-stable (tuples → lists, numpy scalars → Python)."""
  if isinstance(obj, Mapping):
    return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
  if isinstance(obj, (list, tuple)):
    return [_canonical(v) for v in obj]
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return repr(obj)  # JSON has no NaN/inf, and NaN != NaN would refuse every resume
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return repr(obj)


def _fsync_dir(path: Path) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # Some platforms cannot open directories; the rename is still atomic.
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _atomic_write(path: Path, write) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(path.parent)


class ConfigMismatchError(ValueError):
  """A run directory was written by a run with a different configuration."""


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      name = f"{prefix}.{key}" if prefix else key
      if key not in old or key not in new:
        out.append(name)
      else:
        out.extend(_differences(old[key], new[key], name))
    return out
  return [] if old == new else [prefix or "<root>"]


class ChunkStore:
  """Finished chunks of a run, keyed by chunk index, in ``run_dir/chunks``.

  Args:
    run_dir: the run's directory (created if absent).
    fingerprint: JSON-serialisable description of everything that determines
      the chunks' contents. Stored on first use; a later store opened on the
      same directory with a different fingerprint raises ``ValueError``
      naming the fields that differ.
  """

  def __init__(self, run_dir: str | os.PathLike, fingerprint: Mapping[str, Any]):
    if not isinstance(run_dir, (str, os.PathLike)) or str(run_dir) == "":
      raise TypeError(f"run_dir must be a non-empty path, got {run_dir!r}")
    if not isinstance(fingerprint, Mapping):
      raise TypeError(f"fingerprint must be a mapping, got {type(fingerprint).__name__}")
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
      raise ValueError(f"run_dir {run_dir} exists and is not a directory")
    self.run_dir = Path(run_dir)
    self.chunk_dir = self.run_dir / "chunks"
    self.fingerprint = _canonical(dict(fingerprint))
    self.chunk_dir.mkdir(parents=True, exist_ok=True)
    manifest = self.run_dir / _MANIFEST
    if manifest.exists():
      try:
        stored = json.loads(manifest.read_text())
      except json.JSONDecodeError as e:
        raise ValueError(f"{manifest} is not valid JSON ({e}); delete the run directory to start over") from e
      if stored != self.fingerprint:
        fields = ", ".join(_differences(stored, self.fingerprint)) or "<structure>"
        raise ConfigMismatchError(
            f"cannot resume in {self.run_dir}: it was started with a different configuration "
            f"(differs in: {fields}); use another output directory or delete this one")
    else:
      text = json.dumps(self.fingerprint, indent=1, sort_keys=True).encode()
      _atomic_write(manifest, lambda f: f.write(text))

  def _path(self, index: int) -> Path:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) \
        or not 0 <= index < 10**6:
      raise ValueError(f"chunk index must be an integer in [0, 10**6), got {index!r}")
    return self.chunk_dir / f"chunk_{index:06d}.npz"

  def completed(self) -> list[int]:
    """Indices of the chunks already on disk, sorted."""
    return sorted(int(m.group(1)) for p in self.chunk_dir.iterdir()
                  if (m := _CHUNK_RE.match(p.name)))

  def has(self, index: int) -> bool:
    return self._path(index).exists()

  def save(self, index: int, tree: Any) -> None:
    """Atomically writes one chunk: a pytree of arrays (params or predictions)."""
    import jax  # pylint: disable=g-import-not-at-top  (keeps this module light to import)
    path = self._path(index)
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    for name, a in arrays.items():
      if a.dtype.kind not in "biufc":  # object arrays would need pickle to load
        raise TypeError(f"tree leaf {name} has dtype {a.dtype}; only numeric arrays are stored")
    _atomic_write(path, lambda f: np.savez(f, **arrays))

  def load(self, index: int, like: Any) -> Any:
    """Reads chunk ``index`` into the structure of the pytree ``like``.

    ``like``'s leaves may be arrays or ``jax.ShapeDtypeStruct``s; only their
    structure and shapes are used.

    Raises:
      ValueError: the file holds a different number of leaves or shapes than
        ``like`` (a corrupted or foreign chunk).
    """
    import jax  # pylint: disable=g-import-not-at-top
    treedef = jax.tree_util.tree_structure(like)
    like_leaves = jax.tree_util.tree_leaves(like)
    path = self._path(index)
    try:
      with np.load(path, allow_pickle=False) as data:
        names = sorted(data.files)
        if len(names) != len(like_leaves):
          raise ValueError(f"chunk {index} in {self.chunk_dir} has {len(names)} arrays, expected {len(like_leaves)}")
        leaves = [data[name] for name in names]
    except (OSError, EOFError, zipfile.BadZipFile) as e:
      if isinstance(e, FileNotFoundError):
        raise
      raise ValueError(f"chunk {index}: {path} is corrupt ({e}); delete it to retrain it") from e
    except ValueError as e:
      if str(e).startswith(f"chunk {index}"):
        raise
      raise ValueError(f"chunk {index}: {path} is corrupt ({e}); delete it to retrain it") from e
    for name, got, want in zip(names, leaves, like_leaves):
      want_shape = tuple(want.shape) if hasattr(want, "shape") else np.shape(want)
      if got.shape != want_shape:
        raise ValueError(f"chunk {index}: {name} has shape {got.shape}, expected {want_shape}")
    return jax.tree_util.tree_unflatten(treedef, leaves)
