"""Ensemble FedAvg on HAR: train, certify, write results and the figure.

Usage:
  python experiments/har.py --preset cpu
  python experiments/har.py --baseline  # the paper's setting: k=2, exact (435 models)

Defaults are the paper's settings; `--preset cpu` is a CPU-sized run, and any
flag given explicitly overrides the preset. `--help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from ensemble_fl import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  sys.exit(experiment.cli_main("har"))
