"""`python -m kochat_trl`: the `kochat-trl` command."""

import sys

from kochat_trl.cli import main

sys.exit(main())
