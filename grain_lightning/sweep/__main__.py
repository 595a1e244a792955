"""``python -m grain_lightning.sweep ...``: the same as ``grain sweep ...``."""

import sys

from grain_lightning.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
