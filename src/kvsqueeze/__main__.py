"""`python -m kvsqueeze ...`: the same command line as the `kvsqueeze` script."""

import sys

from kvsqueeze.cli import main

sys.exit(main())
