"""``python -m libchirp``: the ``chirp`` command (see :mod:`libchirp.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
