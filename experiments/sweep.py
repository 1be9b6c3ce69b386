"""A grid over one parameter: the paper's Figures 3-6 (impact of k, N, α, q).

Usage:
  python experiments/sweep.py --dataset mnist --param k --values 5 10 20 --preset cpu
  python experiments/sweep.py --dataset har --param N --values 100 300 500 --preset cpu
  python experiments/sweep.py --dataset mnist --param alpha --values 0.1 0.01 0.001 --preset cpu

Every flag of experiments/<dataset>.py passes through (the preset, --global-iters,
--data-dir, ...). Each value's run goes to <out>/<param>=<value>/ (the files of
experiments/mnist.py), and <out>/sweep.csv, <out>/sweep.png hold one CA@m curve
per value. An α sweep trains once and certifies the same votes at each α; an N
sweep in Monte Carlo or deterministic mode trains the largest ensemble once and
certifies its first N models for each N (exactly the ensemble a run with that N
trains). With --checkpoint, finished chunks of models go to <out>/checkpoint/
and a rerun of the same command resumes. HAR sweeps of N or α use k=4 unless
--k is given (the paper's choice: k=2 is exact, where neither N nor α
matters). The single-FedAvg baseline is off unless --baseline is given.
--out must be new or empty (or --overwrite; --checkpoint resumes). Exit
status as experiments/mnist.py: 0 done, 2 refused, 3 a run diverged, 130
interrupted.
"""

import sys

from ensemble_fl import cli

if __name__ == "__main__":
  sys.exit(cli.sweep_main())
