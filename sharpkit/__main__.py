"""``python -m sharpkit``: the ``sharpkit`` command (as ``torchrun -m sharpkit`` runs it)."""

import sys

from sharpkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
