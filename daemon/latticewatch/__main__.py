"""``python -m latticewatch`` is the ``latticewatch`` command."""

import sys

from latticewatch.cli import main

sys.exit(main())
