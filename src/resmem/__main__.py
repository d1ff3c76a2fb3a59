"""`python -m resmem ...` runs the `resmem` command line."""

import sys

from .cli import main

sys.exit(main())
