"""``python -m torchslim``: the same as the ``torchslim`` command."""

import sys

from torchslim.cli import main

sys.exit(main())
