"""A grid over one parameter: the paper's Figures 3-6 (impact of k, N, α, q).

Usage:
  python experiments/sweep.py --dataset mnist --param k --values 5 10 20 --preset cpu
  python experiments/sweep.py --dataset har --param N --values 100 300 500 --preset cpu
  python experiments/sweep.py --dataset mnist --param alpha --values 0.1 0.01 0.001 --preset cpu

Every flag of experiments/<dataset>.py passes through (the preset, --global-iters,
--data-dir, ...). Each value's run goes to <out>/<param>=<value>/ (the files of
experiments/mnist.py), and <out>/sweep.csv, <out>/sweep.png hold one CA@m curve
per value. An α sweep trains once and certifies the same votes at each α; an N
sweep in Monte Carlo mode trains the largest ensemble once and certifies its
first N models for each N (exactly the ensemble a run with that N trains).
With --checkpoint, finished chunks of models go to <out>/checkpoint/ and a rerun
of the same command resumes. HAR sweeps of N or α use k=4 unless --k is given (the paper's choice: k=2 is
exact, where neither N nor α matters). The single-FedAvg baseline is off unless
--baseline is given.
"""

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

# pylint: disable=g-import-not-at-top,wrong-import-position
from ensemble_fl import experiment
from ensemble_fl import progress as progress_lib
from ensemble_fl import results


def make_parser(dataset):
  parser = experiment.make_parser(dataset)
  parser.prog = "experiments/sweep.py"
  parser.description = "Certified accuracy for each value of one parameter (Figures 3-6)."
  g = parser.add_argument_group("sweep")
  g.add_argument("--dataset", choices=experiment.DATASETS, required=True)
  g.add_argument("--param", choices=tuple(experiment.SWEEP_PARAMS), required=True,
                 help="the parameter to vary")
  g.add_argument("--values", nargs="+", required=True, metavar="V", help="its values")
  parser.set_defaults(out=None)
  return parser


def parse_values(param, texts):
  kind = float if param in ("alpha", "q") else int
  values = []
  for t in texts:
    try:
      values.append(kind(t))
    except ValueError:
      raise ValueError(f"--values: {t!r} is not a valid {kind.__name__} for --param {param}") \
          from None
  return values


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  pre = experiment.ArgumentParser(add_help=False)
  pre.add_argument("--dataset", choices=experiment.DATASETS)
  dataset = pre.parse_known_args(argv)[0].dataset or "mnist"
  parser = make_parser(dataset)
  args = parser.parse_args(argv)
  with experiment.user_errors(parser):
    values = parse_values(args.param, args.values)
    if args.checkpoint and not args.out:
      raise ValueError("--checkpoint needs --out (the folder to resume in)")
    cfg = experiment.config_from_args(args, dataset)
    if args.baseline is None:
      cfg = dataclasses.replace(cfg, baseline=False)
    if dataset == "har" and args.param in ("N", "alpha") and args.k is None:
      cfg = dataclasses.replace(cfg, k=4)
    configs = experiment.sweep_configs(cfg, args.param, values)
    start = time.perf_counter()
    data = experiment.load_data(configs[0])
  load_seconds = time.perf_counter() - start
  out = Path(args.out or experiment.default_out_dir(f"sweep-{dataset}-{args.param}"))
  runs = []
  sweep = experiment.run_sweep(cfg, args.param, values, data=data,
                               timings={"load_data": load_seconds},
                               checkpoint_root=out / "checkpoint" if args.checkpoint else None,
                               progress_factory=progress_lib.ProgressBar)
  try:
    for value, result in sweep:
      if args.param == "alpha" and result.alpha is None and not runs:
        print(f"warning: {result.mode} mode does not depend on α: all curves are the same",
              file=sys.stderr)
      results.write_outputs(out / f"{args.param}={value}", result)
      runs.append((value, result))
  except experiment.ResumeError as e:
    parser.error(" ".join(str(e).split()))
  paths = results.write_sweep(out, args.param, dataset, runs)
  print(results.sweep_summary(args.param, runs, time.perf_counter() - start))
  print(f"outputs: {out}/ ({', '.join(p.name for p in paths)}, "
        f"{len(runs)} run folders)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
