"""`python -m sudo_queue` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
