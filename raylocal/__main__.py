"""`python -m raylocal COMMAND ...`: the `raylocal` command."""

import sys

from raylocal.cli import main

sys.exit(main())
