"""``python -m ensemble_fl certify|remove``: the deployed ensemble's command line."""

import sys

from ensemble_fl import cli

if __name__ == "__main__":
  sys.exit(cli.package_main())
