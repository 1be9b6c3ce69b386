"""Progress and timing of long runs: a dependency-free progress bar with an ETA, and
:func:`timed`, the wall time of each phase.

``ProgressBar`` is a callable ``progress(done, total)``, the callback that
``ensemble.train_ensemble`` invokes after each chunk of models. It writes to
stderr (so stdout stays clean for the summary table):

* on a terminal, one line redrawn in place with ``\\r``;
* otherwise (a log file, a pipe, CI), a plain line at most every
  ``min_interval`` seconds plus the final one, so logs stay short.

The ETA is a linear extrapolation of the time per model since the *first*
update (the first chunk includes compilation and would inflate every later
estimate); before a second update it falls back to the overall rate.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str,
          log: Callable[[str], None] | None = None) -> Iterator[None]:
  """Adds the wall time of the ``with`` body to ``timings[phase]`` (summing repeats).

  With ``log``, also reports ``"<phase> ..."`` on entry and the phase's total on exit.
  """
  if log is not None:
    log(f"{phase} ...")
  start = time.perf_counter()
  try:
    yield
  finally:
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
  if log is not None:
    log(f"{phase}: {timings[phase]:.1f} s")


def format_bytes(n: float) -> str:
  """``999`` -> ``'999 B'``; ``9912422`` -> ``'9.9 MB'`` (SI units); NaN/inf -> ``'?'``."""
  if not n >= 0 or n == float("inf"):
    return "?"
  for unit in ("B", "kB", "MB", "GB"):
    if n < 999.5 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000.0
  raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
  """``75.3`` -> ``'1:15'``; ``3725`` -> ``'1:02:05'``; negative/NaN -> ``'?'``."""
  if not seconds >= 0 or seconds == float("inf"):
    return "?"
  s = int(round(seconds))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
  """``progress(done, total)`` callback drawing ``desc [#####....] done/total``.

  Args:
    desc: a short label printed before the bar.
    stream: where to write (default ``sys.stderr``).
    width: number of characters of the bar itself.
    min_interval: for non-terminal streams, seconds between printed lines.
    clock: time source (injectable for tests).
    unit_bytes: ``done`` and ``total`` count bytes: shown as sizes, with the
      average speed (for downloads).
  """

  def __init__(
      self,
      desc: str = "",
      *,
      stream: TextIO | None = None,
      width: int = 30,
      min_interval: float = 10.0,
      clock: Callable[[], float] = time.monotonic,
      unit_bytes: bool = False,
  ):
    self.unit_bytes = unit_bytes
    self.desc = desc
    self.stream = stream if stream is not None else sys.stderr
    self.width = width
    self.min_interval = min_interval
    self.clock = clock
    self._start = clock()
    self._first: tuple[float, int] | None = None  # (time, done) at the first update
    self._last_print = -float("inf")
    self._finished = False
    try:
      self._tty = bool(self.stream.isatty())
    except (AttributeError, ValueError):
      self._tty = False

  def eta(self, done: int, total: int, now: float) -> float:
    """Seconds left, extrapolated from the rate since the first update."""
    if done >= total:
      return 0.0
    if self._first is not None and done > self._first[1]:
      t0, d0 = self._first
      rate = (now - t0) / (done - d0)
    elif done > 0:  # one update so far: the only rate there is (compilation included)
      rate = (now - self._start) / done
    else:
      return float("nan")
    return rate * (total - done)

  def render(self, done: int, total: int, now: float) -> str:
    frac = done / total if total > 0 else 1.0
    filled = int(round(frac * self.width))
    bar = "#" * filled + "." * (self.width - filled)
    elapsed = now - self._start
    counts = f"{done}/{total}"
    if self.unit_bytes:
      speed = format_bytes(done / elapsed) if elapsed > 0 else "?"
      counts = f"{format_bytes(done)}/{format_bytes(total)} {speed}/s"
    text = (f"{self.desc + ' ' if self.desc else ''}[{bar}] {counts} "
            f"{100 * frac:3.0f}% elapsed {format_duration(elapsed)}")
    if done < total:
      text += f" eta {format_duration(self.eta(done, total, now))}"
    return text

  def __call__(self, done: int, total: int) -> None:
    if self._finished:
      return
    now = self.clock()
    if self._first is None:
      self._first = (now, done)
    final = done >= total
    if self._tty:
      self.stream.write("\r" + self.render(done, total, now) + ("\n" if final else ""))
    elif final or now - self._last_print >= self.min_interval:
      self.stream.write(self.render(done, total, now) + "\n")
      self._last_print = now
    self.stream.flush()
    self._finished = final

  def close(self) -> None:
    """Ends the line on a terminal if the bar stopped before ``total``."""
    if self._tty and not self._finished and self._first is not None:
      self.stream.write("\n")
      self.stream.flush()
    self._finished = True
