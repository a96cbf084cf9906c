"""`python -m hack.devcluster COMMAND` (from the repository root)."""

import sys

from hack.devcluster.cli import main

sys.exit(main())
