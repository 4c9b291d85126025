import sys

from kochat_trl.cli import main

sys.exit(main())
