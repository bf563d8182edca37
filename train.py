#!/usr/bin/env python
"""Train a BitNet b1.58 model: ``python train.py --config configs/tiny.yaml``. See bitnet_jax/train.py."""

import sys

from bitnet_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
