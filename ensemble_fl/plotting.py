"""Certified-accuracy figures (the paper's Figures 2-6), with matplotlib's Agg backend.

matplotlib is an optional dependency: it is imported when a figure is drawn,
and when it is missing the figure is skipped with a warning (the numbers are
in the CSV/JSON files anyway).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

# One (label, m values, CA@m values) triple per curve.
Curve = tuple[str, Sequence[int], Sequence[float]]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _pyplot():
  """``(matplotlib.pyplot, MaxNLocator)`` on the Agg backend, or Nones (with a warning)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  except ImportError:
    warnings.warn("matplotlib is not installed: skipping the figure "
                  "(pip install matplotlib to get it)", stacklevel=3)
    return None, None
  return plt, MaxNLocator


def plot_curves(
    path: str | os.PathLike,
    curves: Sequence[Curve],
    *,
    title: str = "",
    xlabel: str = "number of malicious clients m",
    ylabel: str = "certified accuracy",
) -> Path | None:
  """Draws CA@m against m, one line per curve, and saves it to ``path``.

  Returns:
    The path written, or None when matplotlib is unavailable.
  """
  plt, MaxNLocator = _pyplot()  # pylint: disable=invalid-name
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
  try:
    longest = max((len(m) for _, m, _ in curves), default=1)
    for i, (label, m, ca) in enumerate(curves):
      m = np.asarray(m)
      ax.plot(m, np.asarray(ca), label=label, linewidth=1.6,
              marker=_MARKERS[i % len(_MARKERS)] if longest <= 25 else None,
              markersize=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # m counts clients
    ax.grid(True, alpha=0.3)
    if title:
      ax.set_title(title, fontsize=10)
    if curves:
      ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
  finally:
    plt.close(fig)
  return path
