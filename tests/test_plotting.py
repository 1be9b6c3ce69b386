"""ensemble_fl.plotting: what a figure shows, read back from the written PNG."""

import struct

import numpy as np
import pytest

from ensemble_fl import plotting

pytest.importorskip("matplotlib")


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])  # IHDR: width, height


def _curves(count):
  m = list(range(0, 30))
  return [(f"curve {i}", m, list(np.linspace(0.9 - 0.01 * i, 0.0, len(m)))) for i in range(count)]


@pytest.mark.parametrize("count", [1, plotting.LEGEND_INSIDE_MAX, 11])
def test_a_long_legend_goes_below_the_axes_and_the_figure_grows_for_it(tmp_path, count):
  small = plotting.plot_curves(tmp_path / "one.png", _curves(1))
  got = plotting.plot_curves(tmp_path / "many.png", _curves(count))
  (w1, h1), (w, h) = _png_size(small), _png_size(got)
  if count <= plotting.LEGEND_INSIDE_MAX:
    assert (w, h) == (w1, h1)  # the legend sits inside: same canvas
  else:
    assert h > h1 * 1.3  # room for the entries under the axes


def test_curves_past_the_colour_cycle_get_another_dash(tmp_path, monkeypatch):
  import matplotlib.axes
  styles = []
  real_plot = matplotlib.axes.Axes.plot
  def recording_plot(self, *args, **kwargs):
    styles.append(kwargs.get("linestyle"))
    return real_plot(self, *args, **kwargs)
  monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
  plotting.plot_curves(tmp_path / "f.png", _curves(12))
  colours = 10  # matplotlib's default cycle
  pairs = {(i % colours, styles[i]) for i in range(12)}
  assert len(pairs) == 12  # no two curves share colour and dash
