"""Ensemble FedAvg on MNIST: train, certify, write results and the figure.

Usage:
  python experiments/mnist.py --preset cpu
  python experiments/mnist.py --k 10 --N 500 --baseline  # the paper's setting (GPU)

Defaults are the paper's settings; `--preset cpu` is a CPU-sized run, and any
flag given explicitly overrides the preset. `--help` lists every flag.
"""

import sys

from ensemble_fl import cli

if __name__ == "__main__":
  sys.exit(cli.experiment_main("mnist"))
