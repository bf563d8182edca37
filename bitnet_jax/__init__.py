"""bitnet-jax: train BitNet b1.58 language models with JAX and Flax NNX."""

__version__ = "0.1.0"
