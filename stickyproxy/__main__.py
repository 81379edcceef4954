"""``python -m stickyproxy``: see :mod:`stickyproxy.cli`."""

from __future__ import annotations

import sys

from stickyproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
