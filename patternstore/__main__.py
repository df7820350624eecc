"""``python -m patternstore``: the same command line as the ``patternstore`` script."""

import sys

from .cli import main

sys.exit(main())
