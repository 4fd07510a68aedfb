"""`python -m mirrorprune ...` is the same as the `mirrorprune` command."""

import sys

from .cli import main

sys.exit(main())
