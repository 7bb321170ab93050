"""``python -m pipetrain``: the same as the ``pipetrain`` command."""

import sys

from pipetrain.cli import main

sys.exit(main())
