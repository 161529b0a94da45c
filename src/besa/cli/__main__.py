"""``python -m besa.cli``: the ``besa`` command."""

import sys

from besa.cli import main

sys.exit(main())
