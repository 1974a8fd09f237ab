"""``python -m prewarm_gpu`` → the ``prewarm-gpu`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
