"""``python -m wsgisession``: the command-line interface (see wsgisession.cli)."""

import sys

from .cli import main

sys.exit(main())
