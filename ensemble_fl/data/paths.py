"""Where the offline data sets live.

Lookup order for the data root (the folder holding ``mnist/``, ``har/`` and
``hapt/``):

1. ``$ENSEMBLE_FL_DATA`` when it is set and non-empty. It is then the *only*
   place searched: a user who names a folder should get an error about that
   folder, not data silently picked up from somewhere else.
2. ``<repo>/../shared/data``, the layout of the development workspace and of CI
   (a copy of ``shared/`` beside the clone).
3. ``<repo>/shared/data``.

``<repo>`` is the parent of the ``ensemble_fl`` package directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

ENV_VAR = "ENSEMBLE_FL_DATA"

# parents: [0] data/, [1] ensemble_fl/, [2] the checkout.
_REPO = Path(__file__).resolve().parents[2]


def candidate_data_dirs() -> list[Path]:
  """All data roots that are consulted, in priority order (existing or not).

  Returns:
    ``[Path($ENSEMBLE_FL_DATA)]`` when the variable is set, otherwise the two
    folders next to / inside the checkout.
  """
  env = os.environ.get(ENV_VAR, "").strip()
  if env:
    return [Path(env).expanduser()]
  return [_REPO.parent / "shared" / "data", _REPO / "shared" / "data"]


def default_data_dir() -> Path | None:
  """The data root to use when the caller names none.

  Returns:
    ``$ENSEMBLE_FL_DATA`` when set (even if missing, so that the error later
    names it), else the first existing folder among
    ``<repo>/../shared/data`` and ``<repo>/shared/data``, else ``None``.
  """
  candidates = candidate_data_dirs()
  if os.environ.get(ENV_VAR, "").strip():
    return candidates[0]
  for path in candidates:
    if path.is_dir():
      return path
  return None


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
  """
  if explicit is not None:
    base = Path(explicit).expanduser()
    candidates = [base, base / subdir]
  else:
    candidates = [root / subdir for root in candidate_data_dirs()]
  for folder in candidates:
    if _has_all(folder, required):
      return folder
  lines = []
  for folder in candidates:
    if not folder.is_dir():
      lines.append(f"  {folder}  (no such folder)")
    else:
      missing = [n for n in required if not (folder / n).is_file()]
      lines.append(f"  {folder}  (missing: {', '.join(missing)})")
  what = f" containing {', '.join(required)}" if required else ""
  source = ("the given folder" if explicit is not None else
            f"${ENV_VAR}" if os.environ.get(ENV_VAR, "").strip() else
            "the default places")
  msg = f"no '{subdir}' data folder{what} found in {source}. Looked in:\n" + "\n".join(lines)
  if explicit is None and not os.environ.get(ENV_VAR, "").strip():
    msg += f"\nSet ${ENV_VAR} to the data root (the folder holding '{subdir}/')."
  if hint:
    msg += "\n" + hint
  raise FileNotFoundError(msg)
