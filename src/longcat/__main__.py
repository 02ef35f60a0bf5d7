"""`python -m longcat ...`: the same as the `longcat` command (torchrun starts workers this way)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
