"""The config.yaml keys status reads, read leniently: a report of a run whose config is missing,
damaged or from another version still shows what the event files say."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass
class RunConfig:
    """The config.yaml keys status reads; any missing or mistyped key is None."""

    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    # Resolved: optim.stage_switch, or train.steps // 2 when null. The update with count stage_switch
    # is the first of stage 2, and the trainer logs update count t as step t + 1, so stage_switch is
    # the last logged step of stage 1.
    stage_switch: int | None = None
    prompts: list[str] = dataclasses.field(default_factory=list)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        def get(section: str, key: str, kind: type = int):
            value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        steps = get("train", "steps")
        switch = get("optim", "stage_switch")
        if switch is None and steps is not None:
            switch = steps // 2
        prompts = (data.get("log") or {}).get("prompts") if isinstance(data.get("log"), dict) else None
        if isinstance(prompts, str):
            prompts = [prompts]
        return cls(steps, get("train", "batch_size"), get("train", "seq_len"), switch,
                   [str(p) for p in prompts or []], data)

    def get(self, section: str, key: str) -> Any:
        sec = self.raw.get(section)
        return sec.get(key) if isinstance(sec, dict) else None

    @property
    def tokens_per_step(self) -> int | None:
        if self.batch_size is None or self.seq_len is None:
            return None
        return self.batch_size * self.seq_len


def load_config(path: Path) -> tuple[RunConfig | None, str | None]:
    """``(config, None)``, or ``(None, why not)`` when config.yaml is missing or unreadable."""
    if not path.is_file():
        return None, f"{path.name} not found: totals, tokens and the stage switch are unknown"
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"{path.name} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): totals unknown"
    except (OSError, yaml.YAMLError) as e:
        return None, f"{path.name} could not be read ({e.__class__.__name__}): totals unknown"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a mapping of config sections: totals unknown"
    return RunConfig.from_dict(data), None
