#!/usr/bin/env python
"""Training run status from the run directory's files: ``python status.py RUN_DIR [--json]
[--plot FILE.png] [--watch SECONDS]``. Thin CLI over ``bitnet_jax.status``."""

import sys

from bitnet_jax.status import main

if __name__ == "__main__":
    sys.exit(main())
