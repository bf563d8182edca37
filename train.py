#!/usr/bin/env python
"""Train a BitNet b1.58 model: ``python train.py --config configs/tiny.yaml``. See bitnet_jax/train.py."""

from bitnet_jax.train_cli import run_cli

if __name__ == "__main__":
    run_cli()
