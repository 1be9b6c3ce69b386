"""Ensemble FedAvg on HAR: train, certify, write results and the figure.

Usage:
  python experiments/har.py --preset cpu
  python experiments/har.py --baseline  # the paper's setting: k=2, exact (435 models)

Defaults are the paper's settings; `--preset cpu` is a CPU-sized run, and any
flag given explicitly overrides the preset. `--help` lists every flag.
"""

import sys

from ensemble_fl import cli

if __name__ == "__main__":
  sys.exit(cli.experiment_main("har"))
