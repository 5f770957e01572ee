"""``python -m openqpm``: the same command line as the ``openqpm`` script."""

import sys

from openqpm.cli import main

sys.exit(main())
