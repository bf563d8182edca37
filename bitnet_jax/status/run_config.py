"""config.yaml as status reads it: leniently, through the trainer's own config classes
(``config.load_lenient``), so a report of a run whose config is damaged, edited by hand or from
another version still shows what can be known, and every rule (the stage switch, tokens per step)
has one home."""

from __future__ import annotations

from pathlib import Path

import yaml

from bitnet_jax.config import LenientConfig, load_lenient


def load_config(path: Path) -> tuple[LenientConfig | None, list[str]]:
    """``(config, notes)``; the config is None when config.yaml is missing or unreadable as a whole."""
    if not path.is_file():
        return None, [f"{path.name} not found: totals, tokens and the stage switch are unknown"]
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, [f"{path.name} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): totals unknown"]
    except (OSError, yaml.YAMLError) as e:
        return None, [f"{path.name} could not be read ({e.__class__.__name__}): totals unknown"]
    config = load_lenient(data)
    if config is None:
        return None, [f"{path.name} is not a mapping of config sections: totals unknown"]
    return config, [f"{path.name}: {note}" for note in config.notes]
