"""``python -m pysteer``: the same as the ``pysteer`` command."""

import sys

from .cli import main

sys.exit(main())
