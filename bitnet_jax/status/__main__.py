"""``python -m bitnet_jax.status RUN_DIR ...``."""

import sys

from bitnet_jax.status.cli import main

sys.exit(main())
