"""Ensemble FedAvg on HAR: train, certify, write results and the figure.

Usage:
  python experiments/har.py --preset cpu
  python experiments/har.py --baseline  # the paper's setting: k=2, exact (435 models)

Defaults are the paper's settings; `--preset cpu` is a CPU-sized run, and any
flag given explicitly overrides the preset. `--help` lists every flag.

Outputs go to a new folder results/<name>-<timestamp>/, or to --out (new or
empty, unless --overwrite, or --checkpoint to resume the run it holds).
Exit status: 0 done; 2 refused before any work (one `error:` line); 3 models
diverged to NaN or inf (outputs written and marked; --keep-nonfinite: 0);
130 interrupted.
"""

import sys

from ensemble_fl import cli

if __name__ == "__main__":
  sys.exit(cli.experiment_main("har"))
