"""``python -m besa`` (and ``torchrun ... -m besa prune ...``) is the ``besa`` command."""

import sys

from besa.cli import main

sys.exit(main())
