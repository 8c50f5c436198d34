"""`python -m peftseg.cli <command> …`, as the `peftseg` console script."""

import sys

from peftseg.cli import main

sys.exit(main())
