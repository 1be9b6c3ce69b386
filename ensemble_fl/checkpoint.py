"""Crash-safe storage of finished ensemble chunks.

A paper-scale ensemble trains for hours. :class:`ChunkStore` writes each
finished chunk of models to a run directory *atomically* (write to a temporary
file in the same directory, fsync, then ``os.replace``), so a run killed at any
instant leaves only whole chunks behind, and a restart with the same command
skips them.

Nothing from another configuration is ever mixed in. The run directory's
``manifest.json`` holds a fingerprint of everything that determines the models
(training config, subsample plan, data, model shapes, chunk size); it is
created exclusively (the first writer wins, a second one with another
fingerprint is refused). Every chunk file also carries its own header: the
digest of that fingerprint, its chunk index and a digest of its arrays. A
chunk is used only when all three match, so a deleted manifest, a chunk copied
from another run or over another index, or a damaged file is never read as
models:

- a foreign fingerprint (manifest or chunk) raises :class:`ConfigMismatchError`;
- a damaged or misplaced chunk (unreadable zip, bad CRC, truncated, no header,
  wrong index, arrays that do not match their digest) and an unreadable
  manifest raise :class:`DamagedCheckpointError`, naming the file and telling
  the user to delete it (then that chunk is trained again).

Refusing, rather than retraining a damaged chunk silently, is deliberate: a
damaged file points at a disk or copy problem the user should see, and the
store never deletes a file it did not just write. Both errors are
``ValueError``s with a one-line message. Files are read with
``allow_pickle=False`` only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

_MANIFEST = "manifest.json"
_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.npz$")
# The npz member holding a chunk's header (UTF-8 JSON as uint8); leaves are
# "leaf_00000", ..., so the names cannot collide.
_HEADER = "header"
_CHUNK_FORMAT = 2


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


def fsync_path(path: Path) -> None:
  """Flushes a file or a folder (its entries: a rename into it) to disk."""
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


def _write_temp(path: Path, write) -> Path:
  """Writes and fsyncs a uniquely named temporary file next to ``path``."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    os.unlink(tmp)
    raise
  return Path(tmp)


def _atomic_write(path: Path, write) -> None:
  """Replaces ``path`` with whole new contents: readers see old or new, never part."""
  tmp = _write_temp(path, write)
  os.replace(tmp, path)
  fsync_path(path.parent)


def _exclusive_write(path: Path, write) -> bool:
  """Creates ``path`` with whole contents unless it exists; True when this call created it.

  The complete file is hard-linked into place, which fails when the name
  exists, so of two concurrent writers exactly one wins and nobody ever sees
  a partly written file. On a file system without hard links, falls back to
  ``O_CREAT | O_EXCL`` (still exclusive).
  """
  tmp = _write_temp(path, write)
  try:
    os.link(tmp, path)
  except FileExistsError:
    return False
  except OSError:  # no hard links here
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(tmp.read_bytes())
      f.flush()
      os.fsync(f.fileno())
  finally:
    tmp.unlink()
  fsync_path(path.parent)
  return True


class CheckpointError(ValueError):
  """A checkpoint cannot be used; the message is one line naming the file."""


class ConfigMismatchError(CheckpointError):
  """A run directory, or a chunk in it, was written with a different configuration."""


class DamagedCheckpointError(CheckpointError):
  """A manifest or chunk file is unreadable, misplaced or does not match its digest."""


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


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class ChunkStore:
  """Finished chunks of a run, keyed by chunk index, in ``run_dir/chunks``.

  Args:
    run_dir: the run's directory (created if absent).
    fingerprint: JSON-serialisable description of everything that determines
      the chunks' contents. Stored in ``run_dir/manifest.json`` on first use
      (exclusively); a store opened on the same directory with a different
      fingerprint raises :class:`ConfigMismatchError` naming the fields that
      differ.

  Raises:
    ConfigMismatchError: the manifest, or a chunk already in the directory
      when the manifest is (re)created, holds another fingerprint.
    DamagedCheckpointError: the manifest is not valid JSON (e.g. truncated),
      or a chunk found while (re)creating it is unreadable.
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
    text = json.dumps(self.fingerprint, indent=1, sort_keys=True)
    # What every chunk of this configuration carries in its header.
    self.fingerprint_digest = hashlib.sha256(
        json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
    self.chunk_dir.mkdir(parents=True, exist_ok=True)
    manifest = self.run_dir / _MANIFEST
    if not manifest.exists():
      # Chunks without a manifest (it was deleted): claim the directory only
      # if they are this configuration's, so the manifest never contradicts them.
      for index in self.completed():
        self._read(index, arrays=False)
      if _exclusive_write(manifest, lambda f: f.write(text.encode())):
        return
    try:
      stored = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DamagedCheckpointError(
          f"{manifest} is damaged, not valid JSON ({_one_line(e)}); delete the run directory "
          f"{self.run_dir} to start over") from e
    if stored != self.fingerprint:
      fields = ", ".join(_differences(stored, self.fingerprint)) or "<structure>"
      raise ConfigMismatchError(
          f"cannot resume in {self.run_dir}: it was started with a different configuration "
          f"(differs in: {fields}); use another output directory or delete this one")

  def _path(self, index: int) -> Path:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) \
        or not 0 <= index < 10**6:
      raise ValueError(f"chunk index must be an integer in [0, 10**6), got {index!r}")
    return self.chunk_dir / f"chunk_{index:06d}.npz"

  def completed(self) -> list[int]:
    """Indices of the chunk files on disk, sorted (their contents are checked by :meth:`load`)."""
    return sorted(int(m.group(1)) for p in self.chunk_dir.iterdir()
                  if (m := _CHUNK_RE.match(p.name)))

  def has(self, index: int) -> bool:
    return self._path(index).exists()

  def save(self, index: int, tree: Any, seconds: float | None = None) -> None:
    """Atomically writes one chunk: a pytree of arrays (params or predictions).

    The file holds the leaves and a header with this store's fingerprint
    digest, ``index``, the digest of the leaves and ``seconds``, the wall time
    the chunk took (see :func:`recorded_seconds`).
    """
    import jax  # pylint: disable=g-import-not-at-top  (keeps this module light to import)
    path = self._path(index)
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    for name, a in arrays.items():
      if a.dtype.kind not in "biufc":  # object arrays would need pickle to load
        raise TypeError(f"tree leaf {name} has dtype {a.dtype}; only numeric arrays are stored")
    header = {"format": _CHUNK_FORMAT, "fingerprint": self.fingerprint_digest,
              "index": int(index), "digest": array_digest(*arrays.values()),
              "seconds": None if seconds is None else float(seconds)}
    arrays[_HEADER] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    _atomic_write(path, lambda f: np.savez(f, **arrays))

  def _damaged(self, index: int, path: Path, why: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"checkpoint chunk {index}: {path} is {why}; delete this file and rerun to train "
        f"chunk {index} again")

  def _read(self, index: int, *, arrays: bool) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Reads chunk ``index``'s header (checked) and, if ``arrays``, its leaves (digest-checked).

    Returns:
      ``(header, leaf names sorted, leaves)``; the last two empty unless ``arrays``.
    """
    path = self._path(index)
    try:
      data = np.load(path, allow_pickle=False)
      if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
        raise self._damaged(index, path, "corrupt (not an .npz archive)")
      with data:
        if _HEADER not in data.files:
          raise self._damaged(index, path, "corrupt (no chunk header: not written by this "
                                           "version of ChunkStore)")
        raw = data[_HEADER]
        names = sorted(n for n in data.files if n != _HEADER) if arrays else []
        leaves = [data[name] for name in names]
    except FileNotFoundError:
      raise
    except CheckpointError:
      raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # bad zip, CRC, truncated
      raise self._damaged(index, path, f"corrupt ({_one_line(e)})") from e
    try:
      if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"header is {raw.dtype} {raw.shape}, not uint8 bytes")
      header = json.loads(raw.tobytes().decode())
      if not isinstance(header, dict) or header.get("format") != _CHUNK_FORMAT:
        raise ValueError("unknown header format")
    except (UnicodeDecodeError, ValueError) as e:
      raise self._damaged(index, path, f"corrupt (damaged header: {_one_line(e)})") from e
    if header.get("fingerprint") != self.fingerprint_digest:
      raise ConfigMismatchError(
          f"checkpoint chunk {index}: {path} was written by a run with a different "
          f"configuration than this one (copied or left here from another run); delete it, "
          f"or use another output directory")
    if header.get("index") != index:
      raise self._damaged(index, path, f"misplaced (it holds chunk {header.get('index')!r}, "
                                       f"not chunk {index}: copied or renamed)")
    if arrays and array_digest(*leaves) != header.get("digest"):
      raise self._damaged(index, path, "corrupt (its arrays do not match their digest)")
    return header, names, leaves

  def load(self, index: int, like: Any) -> Any:
    """Reads chunk ``index`` into the structure of the pytree ``like``.

    ``like``'s leaves may be arrays or ``jax.ShapeDtypeStruct``s; only their
    structure and shapes are used. The chunk is used only when its header's
    fingerprint and index are this store's and its arrays match their digest.

    Raises:
      FileNotFoundError: there is no chunk ``index``.
      ConfigMismatchError: the chunk belongs to another configuration.
      DamagedCheckpointError: the file is unreadable, misplaced, does not
        match its digest, or holds a different number of leaves or shapes than
        ``like``.
    """
    import jax  # pylint: disable=g-import-not-at-top
    treedef = jax.tree_util.tree_structure(like)
    like_leaves = jax.tree_util.tree_leaves(like)
    path = self._path(index)
    _, names, leaves = self._read(index, arrays=True)
    if len(names) != len(like_leaves):
      raise DamagedCheckpointError(
          f"checkpoint chunk {index} in {path} has {len(names)} arrays, expected "
          f"{len(like_leaves)}; delete this file and rerun to train chunk {index} again")
    for name, got, want in zip(names, leaves, like_leaves):
      want_shape = tuple(want.shape) if hasattr(want, "shape") else np.shape(want)
      if got.shape != want_shape:
        raise DamagedCheckpointError(
            f"checkpoint chunk {index}: {name} has shape {got.shape}, expected {want_shape} "
            f"in {path}; delete this file and rerun to train chunk {index} again")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def recorded_seconds(run_dir: str | os.PathLike) -> float | None:
  """The wall time of a checkpointed run over every session that worked on it.

  The sum of the ``seconds`` the chunk headers in ``run_dir`` record (each
  chunk's, from the session that trained it); None when a chunk records none
  (written before chunks recorded their time) or there are no chunks. Reads
  headers only; the chunks are assumed checked (by :meth:`ChunkStore.load`).
  """
  total = 0.0
  paths = sorted(p for p in (Path(run_dir) / "chunks").glob("chunk_*.npz")
                 if _CHUNK_RE.match(p.name))
  for path in paths:
    with np.load(path, allow_pickle=False) as data:
      seconds = json.loads(data[_HEADER].tobytes().decode()).get("seconds")
    if seconds is None:
      return None
    total += seconds
  return total if paths else None
