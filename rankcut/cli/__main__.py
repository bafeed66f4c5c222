"""``python -m rankcut.cli``: the same command line as the ``rankcut`` script."""

import sys

from rankcut.cli import main

sys.exit(main())
