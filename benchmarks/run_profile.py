"""Where a finished ``--checkpoint`` run's time went, from what it recorded.

Reads a run folder written by ``experiments/mnist.py --checkpoint --out DIR``
(or har.py) and prints:

* training: every chunk's recorded seconds (the time between two chunk
  finishes; the first includes compiling), their median / min / max and sum,
  and the wall span from the first to the last chunk file;
* the host side of a chunk: the time to write one chunk as the trainer does
  (``ChunkStore.save``: npz, SHA-256, fsync, rename) and to read and verify
  it back, measured now on a copy of the run's first chunk. The trainer
  dispatches the next chunk before it writes one, so a write overlaps the
  next chunk's compute and costs wall time only if it is slower than it;
* prediction and certification: the seconds ``results.json`` records;
* each phase's share of the total.

Usage: python benchmarks/run_profile.py DIR
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

# Runnable from a plain checkout, without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ensemble_fl import checkpoint  # pylint: disable=g-import-not-at-top


def _chunk_seconds(chunks: list[pathlib.Path]) -> list[float | None]:
  out = []
  for path in chunks:
    with np.load(path, allow_pickle=False) as data:
      header = json.loads(data[checkpoint._HEADER].tobytes())  # pylint: disable=protected-access
    out.append(header.get("seconds"))
  return out


def _time_chunk_io(chunk: pathlib.Path, repeats: int = 3) -> tuple[float, float]:
  """Median seconds to save, and to load and verify, the arrays of ``chunk``."""
  with np.load(chunk, allow_pickle=False) as data:
    leaves = [data[k] for k in sorted(data.files) if k.startswith("leaf_")]
  like = [np.empty(leaf.shape, leaf.dtype) for leaf in leaves]
  saves, loads = [], []
  with tempfile.TemporaryDirectory() as tmp:
    store = checkpoint.ChunkStore(tmp, {"profile": 1})
    for i in range(repeats):
      start = time.perf_counter()
      store.save(i, leaves, seconds=0.0)
      saves.append(time.perf_counter() - start)
      start = time.perf_counter()
      store.load(i, like)
      loads.append(time.perf_counter() - start)
  return statistics.median(saves), statistics.median(loads)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", type=pathlib.Path, help="the run's --out folder")
  args = parser.parse_args()
  store_dir = args.run / "checkpoint" / "ensemble"
  chunks = sorted((store_dir / "chunks").glob("chunk_*.npz"))
  if not chunks:
    parser.error(f"no chunks under {store_dir}: was the run made with --checkpoint?")
  manifest = json.loads((store_dir / "manifest.json").read_text())
  seconds = _chunk_seconds(chunks)
  known = [s for s in seconds if s is not None]
  mtimes = [p.stat().st_mtime for p in chunks]
  print(f"{args.run}: {len(chunks)} chunks of {manifest['chunk_size']} models, "
        f"devices {manifest['devices']}")
  if known:
    print(f"chunk seconds: first {known[0]:.1f} (with compiling), then median "
          f"{statistics.median(known[1:] or known):.1f}, min {min(known[1:] or known):.1f}, max "
          f"{max(known[1:] or known):.1f}; sum {sum(known):.0f} s")
  print(f"wall span of the chunk files: {mtimes[-1] - mtimes[0]:.0f} s from the first to the last")
  save_s, load_s = _time_chunk_io(chunks[0])
  size = chunks[0].stat().st_size / 2**20
  print(f"one chunk ({size:.1f} MiB): save {save_s * 1e3:.0f} ms, load + verify "
        f"{load_s * 1e3:.0f} ms (measured now)")

  results_path = args.run / "results.json"
  if not results_path.is_file():
    print("no results.json: the run has not finished")
    return
  timings = json.loads(results_path.read_text())["timings_s"]
  train = timings.get("train_all_sessions") or timings["train"]
  phases = {"train": train, "predict": timings.get("predict", 0.0), "certify": timings.get("certify", 0.0),
            "load data": timings.get("load_data", 0.0)}
  total = sum(phases.values())
  print(f"{'phase':28s} {'seconds':>9s} {'share':>6s}")
  for name, s in phases.items():
    print(f"{name:28s} {s:9.1f} {s / total:6.1%}")
  print(f"{'(chunk writes, overlapped)':28s} {len(chunks) * save_s:9.1f}  inside train: "
        "written while the next chunk computes")
  print(f"{'total':28s} {total:9.1f}  ({total / 60:.1f} min; results.json total "
        f"{timings.get('total', float('nan')):.1f} s)")


if __name__ == "__main__":
  main()
