"""The one error type of the data pipeline, and the sentence about offline mode its messages share."""

from __future__ import annotations

import os

from bitnet_jax.config import ConfigError


class DataError(ConfigError):
    """Data or tokenizer input that cannot be used. The message says what was wrong and what to do.

    A subclass of ``ConfigError`` so that the CLI reports it like any other bad config.
    """


def offline_hint() -> str:
    """A sentence about offline mode when the environment asks for it, else one about the network."""
    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
             if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if flags:
        return (f"This machine is offline for the hub ({'='.join([flags[0], os.environ[flags[0]]])} is set; "
                f"unset {flags[0]} only where the network can reach huggingface.co). ")
    return "The hub could not be reached (no network?). "
