"""Every figure: certified accuracy (the paper's Figures 2-6) and the attack check,
drawn with matplotlib's Agg backend.

matplotlib is an optional dependency: it is imported when a figure is drawn,
and when it is missing the figure is skipped with a warning (the numbers are
in the CSV/JSON files anyway).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

# One (label, m values, CA@m values) triple per curve.
Curve = tuple[str, Sequence[int], Sequence[float]]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", ":")
# The most legend entries drawn inside the axes; more go below them.
LEGEND_INSIDE_MAX = 4


class AttackPoint(NamedTuple):
  """One (attack, m) outcome of the attack check, as :func:`plot_attack` draws it."""

  m: int
  ensemble_accuracy: float
  single_accuracy: float
  violated: bool


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
    points: Sequence[Curve] = (),
) -> Path | None:
  """Draws CA@m against m, one line per curve, and saves it to ``path``.

  ``points``: values known only at some m (e.g. those a paper's text
  states), drawn as unconnected crosses, one legend entry each.

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
      # Past the 10 colours of the cycle a curve would share a colour: change its dash.
      ax.plot(m, np.asarray(ca), label=label, linewidth=1.6, linestyle=_DASHES[i // 10 % 3],
              marker=_MARKERS[i % len(_MARKERS)] if longest <= 25 else None,
              markersize=4)
    for i, (label, m, ca) in enumerate(points):
      ax.scatter(np.asarray(m), np.asarray(ca), label=label, marker="x", s=60, zorder=3,
                 color=f"C{(len(curves) + i) % 10}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # m counts clients
    ax.grid(True, alpha=0.3)
    if title:
      ax.set_title(title, fontsize=10)
    entries = len(curves) + len(points)
    if entries > LEGEND_INSIDE_MAX:  # it would hide the curves: below the axes instead
      fig.set_size_inches(5.5, 4.0 + 0.16 * entries)
      ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)
    elif entries:
      ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
  finally:
    plt.close(fig)
  return path


def plot_attack(
    path: str | os.PathLike,
    panels: Mapping[str, Sequence[AttackPoint]],
    clean_ca: Sequence[float],
    *,
    title: str = "",
) -> Path | None:
  """Accuracy against m, one panel per attack: the ensemble and single FedAvg
  under attack, and the clean ensemble's CA@m (``clean_ca[m]``).

  Returns:
    The path written, or None when matplotlib is unavailable or there is
    nothing to draw.
  """
  if not panels:
    return None
  plt, _ = _pyplot()
  if plt is None:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), dpi=120,
                           sharey=True, squeeze=False)
  try:
    for ax, (name, points) in zip(axes[0], panels.items()):
      points = sorted(points, key=lambda p: p.m)
      ms = [p.m for p in points]
      ax.plot(range(len(clean_ca)), clean_ca, "k--", label="clean CA@m", linewidth=1.2)
      ax.plot(ms, [p.ensemble_accuracy for p in points], "o-", label="ensemble, attacked")
      ax.plot(ms, [p.single_accuracy for p in points], "s-", label="single FedAvg, attacked")
      bad = [p for p in points if p.violated]
      if bad:
        ax.plot([p.m for p in bad], [p.ensemble_accuracy for p in bad], "rx", markersize=10,
                label="violation")
      ax.set_title(name, fontsize=10)
      ax.set_xlabel("malicious clients m")
      ax.set_ylim(-0.02, 1.02)
      ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a violation marker may appear in any panel
      for h, l in zip(*ax.get_legend_handles_labels()):
        if l not in labels:
          handles.append(h)
          labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    if title:
      fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    fig.savefig(path)
  finally:
    plt.close(fig)
  return path
