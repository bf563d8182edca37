"""The one error type of the data pipeline."""

from __future__ import annotations

from bitnet_jax.config import ConfigError


class DataError(ConfigError):
    """Data or tokenizer input that cannot be used. The message says what was wrong and what to do.

    A subclass of ``ConfigError`` so that the CLI reports it like any other bad config.
    """
