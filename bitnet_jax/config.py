"""Typed run configuration: the sections (declared in ``config_schema``: types, bounds and choices
on each field), the rules that tie fields together, YAML files, ``--set`` overrides, and a lenient
reader for tools that only report on a run (status).

A config is validated once, before any compute. Every error says which key was wrong, what was
expected and what to do. The key names ``train.steps``, ``train.batch_size``, ``train.seq_len``,
``train.seed``, ``optim.*``, ``checkpoint.every``, ``eval.every`` and ``mesh.data`` are a contract
read by other tools (status.py, benchmarks).
"""

from __future__ import annotations

import copy
import math
import operator
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import yaml

from bitnet_jax.config_schema import (CheckpointConfig, Config, DataConfig, EvalConfig, LogConfig,
                                      MeshConfig, ModelConfig, OptimConfig, TokenizerConfig, TrainConfig, check,
                                      check_lenient)

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LenientConfig",
           "LogConfig", "MeshConfig", "ModelConfig", "OptimConfig", "TokenizerConfig", "TrainConfig",
           "apply_overrides", "diff_keys", "dump", "from_dict", "load", "load_lenient", "load_with_notes",
           "parse_override", "validate", "with_overrides"]


class ConfigError(ValueError):
    """A config that cannot be run. The message says what to change."""


# --------------------------------------------------------------------------- cross-field rules

def _schedule_problem(cfg: Config, given: Iterable[str]) -> str | None:
    """warmup < stage switch <= steps. The message blames the key set this time (``given``) when it
    is the only one set of those that break the rule, else optim.stage_switch (optim.warmup_steps
    when the switch is implicit: half of train.steps). A warm-up at or past train.steps leaves no
    place for any switch: then optim.warmup_steps is named (train.steps when only that was set)."""
    w, steps, switch, explicit = cfg.optim.warmup_steps, cfg.train.steps, cfg.stage_switch, cfg.optim.stage_switch
    if w < switch <= steps:
        return None
    implicit = "" if explicit is not None else " (half of train.steps)"
    involved = {"train.steps", "optim.stage_switch"} if switch > steps else {
        "optim.warmup_steps", "train.steps" if implicit else "optim.stage_switch"}
    set_now = involved.intersection(given)
    culprit = set_now.pop() if len(set_now) == 1 else "optim.warmup_steps" if implicit else "optim.stage_switch"
    if w >= steps:  # (warmup, steps] is empty: no stage switch fits, so the switch is not what is wrong
        culprit = "train.steps" if "train.steps" in given and "optim.warmup_steps" not in given else \
            "optim.warmup_steps"
    if culprit == "optim.stage_switch":
        return f"optim.stage_switch ({switch}) must lie in (optim.warmup_steps, train.steps] = ({w}, {steps}]"
    got = f"optim.warmup_steps < stage switch <= train.steps must hold, got {w} < {switch}{implicit} <= {steps}"
    if culprit == "train.steps":
        return (f"train.steps ({steps}) is too short for the schedule: {got}; raise train.steps, or set "
                "optim.stage_switch and optim.warmup_steps that fit the shorter run too")
    return f"optim.warmup_steps ({w}) must end before the stage switch: {got}; lower optim.warmup_steps"


def _problems(cfg: Config, given: Iterable[str] = ()) -> Iterator[str]:
    """Every rule that ties fields together (one field's own type and bounds are declared in config_schema)."""
    m, t, o, ev, d = cfg.model, cfg.train, cfg.optim, cfg.eval, cfg.data
    if not cfg.name.strip() or any(c in cfg.name for c in "/\\"):
        yield (f"name {cfg.name!r} starts the run folder's name: give a non-empty name without '/' or '\\', "
               "e.g. name: tiny")
    if m.hidden_size % m.num_attention_heads:
        yield (f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
               f"({m.num_attention_heads})")
    elif m.head_dim % 2:
        yield f"head dim {m.head_dim} (hidden_size / num_attention_heads) must be even for RoPE"
    if m.attention == "cudnn" and m.compute_dtype != "bfloat16":
        yield (f"model.attention 'cudnn' needs model.compute_dtype bfloat16 (cuDNN attention has no "
               f"{m.compute_dtype} kernel); set model.compute_dtype=bfloat16, or model.attention=auto or xla")
    if m.matmul == "int8" and m.quantization == "none":
        yield ("model.matmul 'int8' multiplies BitNet's integer codes, but model.quantization is 'none' (the dense "
               "twin has none); set model.matmul=float, or model.quantization=bitnet")
    if m.num_attention_heads % m.kv_heads:
        yield (f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
               f"model.num_key_value_heads ({m.num_key_value_heads})")
    if t.seq_len > m.max_position_embeddings:
        yield (f"train.seq_len ({t.seq_len}) is above model.max_position_embeddings "
               f"({m.max_position_embeddings}); lower the one or raise the other")
    if t.batch_size % t.grad_accum:
        yield f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})"
    if problem := _schedule_problem(cfg, given):
        yield problem
    if o.min_lr > min(o.peak_lr_1, o.peak_lr_2):
        yield f"optim.min_lr ({o.min_lr}) must lie in [0, min(peak_lr_1, peak_lr_2)]"
    # eval.every = 0 turns evaluation off (no periodic and no final eval); only then may eval.batches
    # be 0 (nothing held out). Evaluating 0 batches would log a NaN eval loss.
    if ev.batches < 0:
        yield f"eval.batches must be >= 1 (or 0 with eval.every=0: no evaluation, nothing held out), got {ev.batches}"
    elif ev.every > 0 and ev.batches == 0:
        yield (f"eval.batches is 0 but evaluation is on (eval.every={ev.every}): it would average no batches; "
               "set eval.batches >= 1, or eval.every=0 to turn evaluation off")
    if ev.every > 0 and d.eval_documents == 0:
        yield (f"data.eval_documents is 0 (nothing held out) but evaluation is on (eval.every={ev.every}, "
               f"eval.batches={ev.batches}); set data.eval_documents to null (just enough) or a positive count, "
               "or eval.every=0 to turn evaluation off")
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        yield f"mesh.data must be >= 1, or -1 for all devices not used by mesh.fsdp; got {cfg.mesh.data}"
    if d.source == "local" and not d.data_files:
        yield "data.source is 'local' but data.data_files is empty; give files or globs"
    ignored = [k for k in ("data_files", "hf_path", "hf_name") if d.source == "builtin" and getattr(d, k)]
    if ignored:  # the builtin corpus would be trained on, not what was asked for
        yield (f"data.source is 'builtin' (the embedded corpus), which ignores data.{ignored[0]}; set "
               "data.source=local for your own files (or fineweb_edu / wikitext for those datasets), or drop "
               f"data.{ignored[0]}")
    if cfg.tokenizer.name_or_path == "builtin" and cfg.tokenizer.builtin_vocab_size < 258:
        yield ("tokenizer.builtin_vocab_size must be >= 258 (256 bytes + BOS/EOS), "
               f"got {cfg.tokenizer.builtin_vocab_size}")


def from_dict(data: dict[str, Any] | None, given: Iterable[str] = ()) -> Config:
    """Builds and validates a Config from nested dicts (as read from YAML). ``given``: the dotted
    keys the user set this time (``--set``), which a broken cross-field rule then names as the cause."""
    cfg, errors = check({} if data is None else data)
    problem = errors[0] if errors else next(_problems(cfg, given), None)
    if problem:
        raise ConfigError(problem)
    return cfg


def validate(cfg: Config) -> None:
    """Refuses a Config built or changed in code as ``from_dict`` would refuse its dict."""
    from_dict(cfg.to_dict())


# --------------------------------------------------------------------------- files and --set

def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.peak_lr_1=2e-3"`` -> (["optim", "peak_lr_1"], 0.002); values are YAML scalars."""
    key, eq, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not eq or not path:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.steps=100")
    try:
        return path, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with each ``section.key=value`` applied."""
    data = copy.deepcopy(data or {})
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or "model:" with nothing under it
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def _keys(overrides: list[str]) -> set[str]:
    return {".".join(parse_override(item)[0]) for item in overrides}


def with_overrides(data: dict[str, Any], overrides: list[str]) -> Config:
    """``from_dict(apply_overrides(data, overrides))``, naming an overridden key when a rule breaks."""
    return from_dict(apply_overrides(data, overrides), given=_keys(overrides))


def _same_share(data: dict[str, Any], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set train.steps=N``: optim.warmup_steps and an explicit optim.stage_switch that are not
    set too keep their share of the run (rounded; a warm-up stays >= 1; warmup < switch <= N).
    Returns the overrides that say so, and a note for the user."""
    given, (base, _), (run, _) = _keys(overrides), check(data), check(apply_overrides(data, overrides))
    if "train.steps" not in given or base is None or run is None or run.train.steps == base.train.steps:
        return [], []  # nothing to derive, or validation proper will say what is wrong
    steps, b, o = run.train.steps, base.optim, run.optim

    def share(n: int) -> int:  # n steps of the file's run as steps of this one, rounded half up
        return math.floor(n * steps / base.train.steps + 0.5)

    if "optim.warmup_steps" not in given:
        o.warmup_steps = max(share(b.warmup_steps), min(b.warmup_steps, 1))
    if "optim.stage_switch" not in given and b.stage_switch is not None:
        o.stage_switch = min(max(share(b.stage_switch), o.warmup_steps + 1), steps)
    if "optim.warmup_steps" not in given and o.warmup_steps >= run.stage_switch:  # too short a run for both
        o.warmup_steps = max(run.stage_switch - 1, 0)
    changed = [(k, getattr(b, k), getattr(o, k)) for k in ("warmup_steps", "stage_switch")
               if f"optim.{k}" not in given and getattr(b, k) != getattr(o, k)]
    if not changed:
        return [], []
    note = ", ".join(f"optim.{k} {old} -> {new}" for k, old, new in changed)
    return [f"optim.{k}={new}" for k, _, new in changed], [f"train.steps={steps}: {note} (same share of the run)"]


def load_with_notes(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, list[str]]:
    """``load``, and one line for each value it derived (see ``_same_share``) for the CLI to print."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for the shipped ones")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = {} if data is None else data  # an empty file: all defaults
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (name:, model:, train:, optim:, ...), "
            f"got a {type(data).__name__} ({str(data)[:60]!r}); see configs/tiny.yaml for the layout")
    data.setdefault("name", path.stem)
    overrides = overrides or []
    derived, notes = _same_share(data, overrides)
    return from_dict(apply_overrides(data, overrides + derived), given=_keys(overrides)), notes


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config file, applies ``--set`` overrides and validates. The result is resolved:
    values derived from the overrides are stored in it, so a resume never derives them again."""
    return load_with_notes(path, overrides)[0]


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def diff_keys(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for section, va in da.items():
        vb = db[section]
        if isinstance(va, dict):
            out += [f"{section}.{k}" for k in va if va[k] != vb[k]]
        elif va != vb:
            out.append(section)
    return out


# --------------------------------------------------------------------------- reading leniently (status)

class _Unread:
    """Stands in for a value that could not be read: arithmetic and comparisons with it fail."""

    __slots__ = ()


class LenientConfig(NamedTuple):
    """A run's config.yaml as far as it could be read (``load_lenient``)."""

    config: Config  # defaults stand in for missing and unreadable values
    unread: frozenset[str]  # dotted keys whose value in the file could not be used (their default stands)
    notes: list[str]  # one line for each key ignored or unread, and for each broken cross-field rule

    def get(self, name: str) -> Any:
        """A dotted key ("train.steps") or a property ("stage_switch", "tokens_per_step") of the
        config, or None when it depends on a value that could not be read: Config's own
        properties compute it, so their rules have no second home."""
        view = self.config.model_copy(deep=True)
        for key in self.unread:
            section, _, field = key.rpartition(".")
            setattr(getattr(view, section) if section else view, field, _Unread())
        try:
            value = operator.attrgetter(name)(view)
        except TypeError:  # the property computed with an unread value
            return None
        return None if isinstance(value, _Unread) else value


def load_lenient(data: Any) -> LenientConfig | None:
    """A config for reporting on a run that already ran (a config.yaml from another version, or
    edited by hand): unknown keys are ignored, unreadable values fall back to their defaults (and
    are listed in ``unread``), broken cross-field rules are noted and the values kept. None when
    ``data`` is not a mapping of sections at all. Imports no jax."""
    if not isinstance(data, dict):
        return None
    cfg, unread, notes = check_lenient(data)
    return LenientConfig(cfg, unread, notes + [f"{problem}; read as written" for problem in _problems(cfg)])
