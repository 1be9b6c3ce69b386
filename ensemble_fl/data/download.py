"""Verified downloads into the data cache, and reading data files safely.

Standard library only (``urllib`` + ``hashlib``). :func:`fetch` tries a list
of mirrors in turn; each attempt streams into a temporary file *inside the
destination folder*, hashing as it goes, and only a file that is complete
(``Content-Length``) and verified (SHA-256 and/or a structure check) is renamed
into place with ``os.replace``. A failed, corrupt or interrupted attempt leaves
nothing behind, so whatever sits in the cache under its final name was
verified once. Every network wait is bounded by ``timeout`` seconds (connect
and each read), so a dead network ends in an error, not a hang.

When every mirror fails, :class:`DownloadError` says in one line which URLs
were tried, why each failed, and how to pre-seed the cache by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Collection, Sequence, TextIO

from ensemble_fl.progress import ProgressBar

TIMEOUT_S = 30.0
_BLOCK = 1 << 16
# Some hosts refuse urllib's default agent ("Python-urllib/3.x").
_USER_AGENT = "ensemble_fl data download (python urllib)"


class DownloadError(FileNotFoundError):
  """No mirror gave a verified copy of a file; the message is one line."""


def one_line(text: object) -> str:
  """``str(text)`` with every run of whitespace (newlines too) made one space."""
  return " ".join(str(text).split())


def read_bytes(path: Path) -> bytes:
  """The content of a data file, with one-line errors for unreadable files.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: it exists but cannot be read (permissions, a folder, I/O).
  """
  try:
    return Path(path).read_bytes()
  except FileNotFoundError as err:
    raise FileNotFoundError(f"{path}: no such file") from err
  except IsADirectoryError as err:
    raise ValueError(f"{path}: is a folder, not a data file") from err
  except OSError as err:  # PermissionError and I/O errors
    raise ValueError(f"{path}: cannot read the file ({err.strerror or err})") from err


def sha256_hex(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


def check_sha256(path: Path, blob: bytes, expected: str, fix: str) -> None:
  """Raises a one-line ValueError unless ``sha256(blob) == expected``.

  Args:
    path: the file ``blob`` was read from (named in the message).
    blob: its content.
    expected: the pinned lower-case hex digest.
    fix: what the user should do, appended to the message.
  """
  digest = sha256_hex(blob)
  if digest != expected:
    raise ValueError(
        f"{path}: SHA-256 {digest} does not match the published file ({expected}); "
        f"the file is damaged or not the original. {fix}")


def base_urls(env_var: str, defaults: Sequence[str]) -> list[str]:
  """The mirrors to use: ``$env_var`` (whitespace-separated URLs) if set, else ``defaults``."""
  override = os.environ.get(env_var, "").split()
  return override or list(defaults)


def join_url(base: str, name: str) -> str:
  """``base`` + ``name`` with exactly one ``/`` between them."""
  return base.rstrip("/") + "/" + name


def _reason(err: BaseException, timeout: float) -> str:
  """A short, one-line reason for a failed attempt."""
  if isinstance(err, urllib.error.HTTPError):
    return f"HTTP {err.code} {one_line(err.reason)}"
  if isinstance(err, urllib.error.URLError):
    err = err.reason if isinstance(err.reason, BaseException) else err
    if not isinstance(err, BaseException):
      return one_line(err)
  if isinstance(err, TimeoutError):
    return f"no answer within {timeout:g} s"
  if isinstance(err, OSError) and err.strerror:
    return one_line(err.strerror)
  return one_line(err) or type(err).__name__


def _partial_name(dest: Path) -> re.Pattern:
  """The names :func:`fetch`'s temporary files of ``dest`` get (mkstemp's 8 characters)."""
  return re.compile(re.escape(f".{dest.name}.") + r"[a-z0-9_]{8}" + re.escape(".part"))


def remove_stale_partials(dest: Path) -> list[Path]:
  """Removes the partial files a killed download of ``dest`` left, never anything else.

  A file is stale when its name is one :func:`fetch` gives ``dest``'s
  temporary file and no process holds its lock (a live download holds it
  until it ends; the kernel drops it when the process dies).

  Returns:
    The files removed.
  """
  pattern, removed = _partial_name(dest), []
  try:
    names = os.listdir(dest.parent)
  except OSError:
    return removed
  for name in names:
    path = dest.parent / name
    if not pattern.fullmatch(name) or path.is_symlink() or not path.is_file():
      continue
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      path.unlink()
      removed.append(path)
    except OSError:  # locked: a live download's; or already gone
      pass
    finally:
      os.close(fd)
  return removed


def fetch(
    urls: Sequence[str],
    dest: str | os.PathLike,
    *,
    sha256: str | Collection[str] | None = None,
    validate: Callable[[Path], None] | None = None,
    size: int | None = None,
    timeout: float = TIMEOUT_S,
    offline_hint: str = "",
    what: str | None = None,
    stream: TextIO | None = None,
) -> Path:
  """Downloads the first of ``urls`` that gives a verified file to ``dest``.

  Each URL is tried once, in order. An attempt fails on any network error
  (no answer within ``timeout`` seconds, refused connection, HTTP error), a
  body shorter than ``Content-Length`` (or ``size``), a SHA-256 not among
  ``sha256``, or an exception from ``validate``; its temporary file is then
  deleted and the next URL is tried. Partial files of ``dest`` that a killed
  download left are removed first (:func:`remove_stale_partials`).

  Args:
    urls: the mirrors' full URLs of this one file.
    dest: final path; its folder is created if needed. An existing file is
      replaced only by a verified download.
    sha256: accepted hex digest(s); None = no digest check (then give
      ``validate``).
    validate: ``validate(tmp_path)`` raises ValueError if the downloaded file
      is not what it should be (a structure check).
    size: the expected size in bytes, when known without the server (used for
      the progress bar and the completeness check).
    timeout: seconds to wait for the connection and for each read.
    offline_hint: appended to the error: how to put the file in place by hand.
    what: the file's name in messages and on the progress bar (default: the
      name of ``dest``).
    stream: where the progress bar goes (default stderr).

  Returns:
    ``Path(dest)``.

  Raises:
    DownloadError: every URL failed (one line naming each URL and why).
    ValueError: the destination folder cannot be written.
  """
  dest = Path(dest)
  what = what or dest.name
  accepted = {sha256} if isinstance(sha256, str) else set(sha256 or ())
  stream = stream if stream is not None else sys.stderr
  try:
    dest.parent.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise ValueError(f"cannot create the data folder {dest.parent} "
                     f"({err.strerror or err}); set $ENSEMBLE_FL_DATA to a writable folder") from err
  remove_stale_partials(dest)
  failures = []
  for url in urls:
    stream.write(f"downloading {url} into {dest.parent}\n")
    try:
      fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as err:
      raise ValueError(f"cannot write into the data folder {dest.parent} "
                       f"({err.strerror or err}); set $ENSEMBLE_FL_DATA to a writable folder") from err
    tmp = Path(tmp_name)
    # Held until the file is renamed or deleted: marks it as a live download's.
    lock = os.open(tmp, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      with os.fdopen(fd, "wb") as out:
        digest = _stream_to(url, out, size=size, timeout=timeout, desc=what, stream=stream)
      if accepted and digest not in accepted:
        raise ValueError(f"SHA-256 {digest} is not the published file's")
      if validate is not None:
        validate(tmp)
      os.replace(tmp, dest)
      return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
      failures.append(f"{url} ({_reason(err, timeout)})")
    finally:
      tmp.unlink(missing_ok=True)  # after os.replace the name is gone: a no-op
      os.close(lock)
  tried = "; ".join(failures) if failures else "no URL given"
  raise DownloadError(one_line(f"could not download {what} into {dest.parent}: tried "
                               f"{tried}. {offline_hint}"))


def _stream_to(url: str, out, *, size: int | None, timeout: float, desc: str,
               stream: TextIO) -> str:
  """Copies the body of ``url`` into ``out``; returns its SHA-256 (hex).

  Raises:
    ValueError: the body is shorter or longer than announced (or than ``size``).
    urllib.error.URLError, http.client.HTTPException, OSError: network errors.
  """
  request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    length = response.headers.get("Content-Length", "")
    announced = int(length) if length.strip().isdigit() else None
    if announced is not None and size is not None and announced != size:
      raise ValueError(f"the server announces {announced} bytes, expected {size}")
    total = announced if announced is not None else size
    bar = ProgressBar(desc, stream=stream, unit_bytes=True) if total else None
    digest = hashlib.sha256()
    done = 0
    try:
      # http.client returns b"" (no error) when the server closes early; the
      # byte count below is what catches a truncated body.
      while block := response.read(_BLOCK):
        out.write(block)
        digest.update(block)
        done += len(block)
        if bar is not None:
          bar(min(done, total), total)
    finally:
      if bar is not None:
        bar.close()
  if total is not None and done != total:
    raise ValueError(f"received {done} of {total} bytes (transfer cut short)" if done < total
                     else f"received {done} bytes, {total} announced")
  return digest.hexdigest()
