"""Attacks against the exact-mode ensemble: an empirical check of every certificate.

Usage:
  python experiments/attack.py                       # HAR, k = 2 (435 models), CPU preset
  python experiments/attack.py --m-values 1,4,8 --attacks scaled,replacement
  python experiments/attack.py --dataset mnist --n-clients 20 --k 2

Trains the clean ensemble, certifies it, then makes m clients malicious with
each attack, retrains the models they touch and counts certified predictions
that changed (there must be none: exit code 1 otherwise, or if a model without
a malicious client is not bit-identical to its clean twin). Writes
attack_results.json, attack_results.csv and attack.png. See experiments/ATTACKS.md.
"""

import sys

from ensemble_fl import cli

if __name__ == "__main__":
  sys.exit(cli.attack_main())
