"""``python -m gapruning.cli``: the ``gapruning`` command."""

import sys

from . import main

sys.exit(main())
