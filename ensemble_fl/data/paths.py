"""Where the data sets live, and where downloads go.

Lookup order for the data root (the folder holding ``mnist/``, ``har/`` and
``hapt/``):

1. ``$ENSEMBLE_FL_DATA`` when it is set and non-empty. It is then the *only*
   place searched, and also where downloads go: a user who names a folder
   should get that folder, not data silently picked up from somewhere else.
2. ``<repo>/../shared/data``, the layout of the development workspace and of CI
   (a copy of ``shared/`` beside the clone); then ``<repo>/shared/data``.
3. The download cache, ``$XDG_CACHE_HOME/ensemble_fl`` (default
   ``~/.cache/ensemble_fl``), with the same ``mnist/``, ``har/``, ``hapt/``
   layout. Loaders download missing files into it (see ``download``).

``<repo>`` is the parent of the ``ensemble_fl`` package directory. A folder the
caller names explicitly (``data_dir``, ``--data-dir``) is searched alone and
never downloaded into.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

ENV_VAR = "ENSEMBLE_FL_DATA"
CACHE_NAME = "ensemble_fl"

# parents: [0] data/, [1] ensemble_fl/, [2] the checkout.
_REPO = Path(__file__).resolve().parents[2]
# The shared data folders beside / inside the checkout (module-level so tests
# can stand in for a fresh clone by emptying it).
SHARED_DIRS: tuple[Path, ...] = (_REPO.parent / "shared" / "data", _REPO / "shared" / "data")


def expand(path: str | os.PathLike, what: str) -> Path:
  """``Path(path).expanduser()``, with a one-line ValueError for an unknown ``~user``.

  Args:
    path: a path, possibly starting with ``~`` or ``~user``.
    what: how the path was given, for the message (e.g. ``"$ENSEMBLE_FL_DATA"``; empty:
      the caller names it).

  Raises:
    ValueError: ``~`` or ``~user`` cannot be expanded (pathlib's RuntimeError).
  """
  try:
    return Path(path).expanduser()
  except RuntimeError as err:  # "Could not determine home directory."
    head = str(path).split("/", 1)[0]
    given = f"{what} = " if what else ""
    raise ValueError(f"{given}{str(path)!r}: cannot expand {head!r} (no such user or "
                     "no home folder); give an absolute path") from err


def _env_root() -> Path | None:
  env = os.environ.get(ENV_VAR, "").strip()
  return expand(env, f"${ENV_VAR}") if env else None


def cache_dir() -> Path:
  """The folder downloads go to (a data root with the usual layout).

  Returns:
    ``$ENSEMBLE_FL_DATA`` when set, else ``$XDG_CACHE_HOME/ensemble_fl`` when
    that variable holds an absolute path (the XDG rule), else
    ``~/.cache/ensemble_fl``. The folder need not exist yet.

  Raises:
    ValueError: ``$ENSEMBLE_FL_DATA`` cannot be expanded, or there is no home
      folder and neither variable is set.
  """
  env = _env_root()
  if env is not None:
    return env
  xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
  if xdg and os.path.isabs(xdg):
    return Path(xdg) / CACHE_NAME
  return expand("~", "the home folder (for the download cache)") / ".cache" / CACHE_NAME


def candidate_data_dirs() -> list[Path]:
  """All data roots that are consulted, in priority order (existing or not).

  Returns:
    ``[$ENSEMBLE_FL_DATA]`` when the variable is set, otherwise the shared
    folders next to / inside the checkout, then :func:`cache_dir`.
  """
  env = _env_root()
  if env is not None:
    return [env]
  try:
    return [*SHARED_DIRS, cache_dir()]
  except ValueError:  # no home folder: no cache to look in (a download names the problem)
    return list(SHARED_DIRS)


def default_data_dir() -> Path | None:
  """The data root to use when the caller names none.

  Returns:
    ``$ENSEMBLE_FL_DATA`` when set (even if missing, so that the error later
    names it), else the first existing folder of :func:`candidate_data_dirs`,
    else ``None``.
  """
  candidates = candidate_data_dirs()
  if os.environ.get(ENV_VAR, "").strip():
    return candidates[0]
  for path in candidates:
    if path.is_dir():
      return path
  return None


def check_data_dir(data_dir: str | os.PathLike) -> Path:
  """Checks a data folder named by the user (the config's ``data_dir``), before any work.

  Returns:
    The expanded path.

  Raises:
    ValueError: ``~user`` cannot be expanded, or the path is a file.
    FileNotFoundError: there is no such folder.
  """
  path = expand(data_dir, "")
  if path.is_file():
    raise ValueError(f"{str(data_dir)!r} is a file, not a folder "
                     "(name the data root holding mnist/, har/, hapt/)")
  if not path.is_dir():
    raise FileNotFoundError(f"{str(data_dir)!r}: no such folder")
  return path


def _has_all(folder: Path, required: Sequence[str]) -> bool:
  return folder.is_dir() and all((folder / name).is_file() for name in required)


def resolve_dir(
    explicit: str | os.PathLike | None,
    subdir: str,
    *,
    required: Sequence[str] = (),
    hint: str = "",
) -> Path:
  """Finds the folder of one data set.

  Args:
    explicit: a folder given by the caller, or None. It may be the data set's
      own folder or a data root containing ``subdir``; only these two are tried
      (no fallback to the defaults, see the module docstring).
    subdir: the data set's folder name under a data root, e.g. ``"mnist"``.
    required: file names that must all be present for a folder to qualify.
    hint: appended to the error message (how to obtain the data).

  Returns:
    The first qualifying folder.

  Raises:
    FileNotFoundError: no candidate qualifies; the message lists every place
      that was looked at and the files that were required.
    ValueError: a path with an unknown ``~user``.
  """
  if explicit is not None:
    base = expand(explicit, "data_dir")
    candidates = [base, base / subdir]
  else:
    candidates = [root / subdir for root in candidate_data_dirs()]
  for folder in candidates:
    if _has_all(folder, required):
      return folder
  lines = []
  for folder in candidates:
    if folder.is_file():
      lines.append(f"  {folder}  (a file, not a folder)")
    elif not folder.is_dir():
      lines.append(f"  {folder}  (no such folder)")
    else:
      missing = [n for n in required if not (folder / n).is_file()]
      lines.append(f"  {folder}  (missing: {', '.join(missing)})")
  what = f" containing {', '.join(required)}" if required else ""
  source = ("the given folder" if explicit is not None else
            f"${ENV_VAR}" if os.environ.get(ENV_VAR, "").strip() else
            "the default places")
  msg = f"no '{subdir}' data folder{what} found in {source}. Looked in:\n" + "\n".join(lines)
  if hint:
    msg += "\n" + hint
  raise FileNotFoundError(msg)
