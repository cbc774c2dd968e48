"""``python -m refusal``: the same command line as ``refusal``."""

import sys

from .cli.main import main

sys.exit(main())
