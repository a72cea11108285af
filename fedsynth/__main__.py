"""``python -m fedsynth``: the same as the ``fedsynth`` command."""

import sys

from fedsynth.cli import main

sys.exit(main())
