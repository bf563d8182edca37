"""Typed run configuration: dataclasses, YAML loading, ``--set`` overrides and validation.

A config is validated once, before any compute. Every error says which key was wrong, what was
expected and what to do. The key names ``train.steps``, ``train.batch_size``, ``train.seq_len``,
``train.seed``, ``optim.*``, ``checkpoint.every``, ``eval.every`` and ``mesh.data`` are a contract
read by other tools (status.py, benchmarks).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot be run. The message says what to change."""


class _BadValue(ConfigError):
    """The value has an accepted type but can never be right (e.g. NaN for a float); a union
    annotation reports this one instead of the generic type mismatch."""


@dataclasses.dataclass(slots=True)
class ModelConfig:
    vocab_size: int = 4096  # must be >= the tokenizer's vocabulary
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None: same as num_attention_heads (no GQA)
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    hidden_act: Literal["relu2", "silu"] = "relu2"
    initializer_range: float = 0.02
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cudnn on GPU with bf16, else xla; cudnn needs bf16

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(slots=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global batch, sequences per optimizer update
    seq_len: int = 128
    seed: int = 0
    grad_accum: int = 1  # micro-batches per update (lax.scan); batch_size must divide by it
    on_nan: Literal["skip", "halt"] = "skip"  # non-finite loss/gradients: skip the update or stop
    # Testing the NaN path: at this step one token id of the batch is made out-of-vocabulary, so the
    # loss is NaN (0: off). See anomaly.poison_if_due.
    debug_poison_step: int = 0


@dataclasses.dataclass(slots=True)
class OptimConfig:
    peak_lr_1: float = 1.5e-3
    peak_lr_2: float = 1.0e-3
    warmup_steps: int = 30
    stage_switch: Optional[int] = None  # None: half of train.steps
    lr_shape: Literal["linear", "cosine"] = "linear"
    min_lr: float = 0.0
    weight_decay: float = 0.1  # stage-1 peak; stage 2 is always 0
    wd_shape: Literal["constant", "cosine"] = "constant"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip, > 0 (a large value such as 1e9: effectively none)


@dataclasses.dataclass(slots=True)
class TokenizerConfig:
    # "builtin": a byte-level BPE trained on the builtin corpus on first use; else a hub name,
    # a tokenizer.json / tokenizer.model file, or a transformers tokenizer folder.
    name_or_path: str = "builtin"
    builtin_vocab_size: int = 4096


@dataclasses.dataclass(slots=True)
class DataConfig:
    source: Literal["builtin", "fineweb_edu", "wikitext", "local"] = "builtin"
    data_files: Optional[list[str]] = None  # local files/globs (local source, or hub sources offline)
    hf_path: Optional[str] = None  # hub dataset; None: the source's default
    hf_name: Optional[str] = None  # hub config, e.g. "sample-10BT"; None: the source's default
    split: str = "train"
    text_column: str = "text"
    text_unit: Literal["paragraph", "line", "file"] = "paragraph"  # what one document is in a txt file
    repeat: bool = True  # wrap around a finite source instead of stopping
    # The first N documents of the stream are held out for evaluation and never trained on.
    # None: as many leading documents as it takes to fill eval.batches batches.
    eval_documents: Optional[int] = None
    num_workers: int = 0  # tokenizer processes; 0: the tokenizer's own thread pool in the loader thread
    prefetch_batches: int = 8  # bounded queue between the loader thread and the trainer
    tokenize_batch: int = 256  # documents per tokenizer call


@dataclasses.dataclass(slots=True)
class CheckpointConfig:
    every: int = 100
    keep_last: int = 2  # newest N checkpoints kept besides the mandatory and `every` ones
    async_save: bool = True


@dataclasses.dataclass(slots=True)
class EvalConfig:
    every: int = 100  # 0: no evaluation at all (neither periodic nor at the end)
    batches: int = 4  # >= 1 while evaluation is on; 0 (only with every 0): nothing held out


@dataclasses.dataclass(slots=True)
class LogConfig:
    metrics_every: int = 100  # BitNet weight/activation metrics
    samples_every: int = 100
    prompts: list[str] = dataclasses.field(
        default_factory=lambda: ["The meaning of", "A function is", "In Python,"]
    )
    max_new_tokens: int = 48
    peak_flops: Optional[float] = None  # per device, FLOP/s; None: looked up from the device kind
    spike_window: int = 100  # steps of history for loss / grad-norm spike checks
    spike_zscore: float = 6.0  # robust z-score (median / MAD of log value) a spike must exceed
    entropy_floor: float = 0.5  # nats; a typical-mode sample below it is an entropy_collapse anomaly
    repetition_max: float = 0.5  # share of repeated 4-grams in a typical-mode sample; above: repetition
    anomaly_dumps_max: int = 50  # anomalies/ folders per event kind at most (past it: TensorBoard only)
    progress: bool = True  # tqdm bar on stderr (shown only when stderr is a terminal)
    print_every: int = 100  # a progress line on stdout every N steps (and at least every 60 s); 0: only the 60 s


@dataclasses.dataclass(slots=True)
class MeshConfig:
    data: int = -1  # devices on the data axis; -1: all devices not used by fsdp
    fsdp: int = 1


@dataclasses.dataclass(slots=True)
class Config:
    name: str = "tiny"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    @property
    def stage_switch(self) -> int:
        """The first step of stage 2 (the resolved ``optim.stage_switch``)."""
        s = self.optim.stage_switch
        return self.train.steps // 2 if s is None else s

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.seq_len

    @property
    def total_tokens(self) -> int:
        return self.train.steps * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building from dicts

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        specific = None
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except _BadValue as e:
                specific = specific or e
            except ConfigError:
                continue
        if specific is not None:
            raise specific
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # a single path or prompt is a list of one
            value = [value]
        if isinstance(value, (list, tuple)):
            return [_coerce(key, v, inner) for v in value]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .nan / .inf in YAML, "nan" / "inf" / "1e999" as strings
                raise _BadValue(f"{key}: expected a finite number, got {_short(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})")


def _finite_hint(field: dataclasses.Field) -> str:
    default = "null" if field.default is None else repr(field.default)
    return f"give a real number (NaN and infinity are not), e.g. the default {default}"


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys ({', '.join(list(fields)[:3])}, ...), "
                          f"got {_short(data)}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (in {where}); valid keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is None:  # "model:" with nothing under it: all defaults
                value = {}
            elif not isinstance(value, dict):
                raise ConfigError(
                    f"{prefix}{name}: expected a section (a mapping of keys such as "
                    f"{', '.join(f.name for f in dataclasses.fields(tp)[:2])}), got {_short(value)}; "
                    f"give {prefix}{name}'s keys under it, or leave it out for the defaults"
                )
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            try:
                kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
            except _BadValue as e:  # surfaces as a plain ConfigError, with what to give instead
                raise ConfigError(f"{e}; {_finite_hint(fields[name])}") from None
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Builds and validates a Config from nested dicts (as read from YAML)."""
    cfg = _build(Config, {} if data is None else data, "")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.peak_lr_1=2e-3"`` -> (["optim", "peak_lr_1"], 0.002); values are YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with each ``section.key=value`` applied."""
    import copy

    data = copy.deepcopy(data or {})
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if nxt is None:  # "model:" with nothing under it
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config file, applies ``--set`` overrides and validates."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for the shipped ones")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # an empty file: all defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (name:, model:, train:, optim:, ...), "
            f"got a {type(data).__name__} ({str(data)[:60]!r}); see configs/tiny.yaml for the layout"
        )
    data.setdefault("name", path.stem)
    return from_dict(apply_overrides(data, overrides or []))


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


# --------------------------------------------------------------------------- validation

def _positive(key: str, value: int | float, hint: str = "") -> None:
    if not value > 0:  # not "value <= 0": NaN must fail too
        raise ConfigError(f"{key} must be positive, got {value}" + (f"; {hint}" if hint else ""))


def _check_finite(cfg: Config) -> None:
    """NaN / infinity in any float field (a Config built in code skips ``_coerce``)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}: expected a finite number, got {value}; "
                                  f"{_finite_hint(f)}")


SEED_MAX = 2**31 - 1  # jax keys take int64; train.seed + 2 derives the sampling key


def validate(cfg: Config) -> None:
    _check_finite(cfg)
    m, t, o = cfg.model, cfg.train, cfg.optim
    if not cfg.name.strip() or any(c in cfg.name for c in "/\\"):
        raise ConfigError(f"name {cfg.name!r} starts the run folder's name: give a non-empty name without "
                          "'/' or '\\', e.g. name: tiny")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings"):
        _positive(f"model.{key}", getattr(m, key))
    for key in ("steps", "batch_size", "seq_len", "grad_accum"):
        _positive(f"train.{key}", getattr(t, key))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
            f"({m.num_attention_heads})"
        )
    if m.head_dim % 2:
        raise ConfigError(f"head dim {m.head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
    _positive("model.rope_theta", m.rope_theta, "it is the RoPE base, e.g. 10000.0")
    _positive("model.rms_norm_eps", m.rms_norm_eps, "it keeps RMSNorm from dividing by zero, e.g. 1e-5")
    _positive("model.initializer_range", m.initializer_range,
              "it is the std of the normal weight init (0 makes every weight zero and nothing learns), e.g. 0.02")
    if m.attention == "cudnn" and m.compute_dtype != "bfloat16":
        raise ConfigError(
            f"model.attention 'cudnn' needs model.compute_dtype bfloat16 (cuDNN attention has no "
            f"{m.compute_dtype} kernel); set model.compute_dtype=bfloat16, or model.attention=auto or xla"
        )
    if m.num_key_value_heads is not None:
        _positive("model.num_key_value_heads", m.num_key_value_heads)
        if m.num_attention_heads % m.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
                f"model.num_key_value_heads ({m.num_key_value_heads})"
            )
    if t.seq_len > m.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len ({t.seq_len}) is above model.max_position_embeddings "
            f"({m.max_position_embeddings}); lower the one or raise the other"
        )
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    if not 0 <= t.seed <= SEED_MAX:
        raise ConfigError(f"train.seed must lie in [0, {SEED_MAX}], got {t.seed}; pick a smaller non-negative seed")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not (o.warmup_steps < cfg.stage_switch <= t.steps):
        raise ConfigError(
            f"optim.stage_switch ({cfg.stage_switch}) must lie in (optim.warmup_steps, train.steps] = "
            f"({o.warmup_steps}, {t.steps}]"
        )
    for key in ("peak_lr_1", "peak_lr_2"):
        _positive(f"optim.{key}", getattr(o, key))
    if o.min_lr < 0 or o.min_lr > min(o.peak_lr_1, o.peak_lr_2):
        raise ConfigError(f"optim.min_lr ({o.min_lr}) must lie in [0, min(peak_lr_1, peak_lr_2)]")
    if not 0 <= o.beta1 < 1 or not 0 <= o.beta2 < 1:
        raise ConfigError("optim.beta1 and optim.beta2 must lie in [0, 1)")
    _positive("optim.eps", o.eps, "it keeps Adam from dividing by zero, e.g. 1e-8")
    if not o.weight_decay >= 0:
        raise ConfigError(f"optim.weight_decay must be >= 0 (0: no decay), got {o.weight_decay}; "
                          "a negative decay grows the weights, e.g. use 0.1")
    _positive("optim.grad_clip", o.grad_clip,
              "it is the global gradient-norm clip threshold (0 stops learning, below 0 flips the "
              "gradient), e.g. 1.0; for effectively no clipping give a large value such as 1e9")
    for key in ("every", "keep_last"):
        if getattr(cfg.checkpoint, key) < 0:
            raise ConfigError(f"checkpoint.{key} must be >= 0 (0 disables), got {getattr(cfg.checkpoint, key)}")
    for key, value in (("eval.every", cfg.eval.every), ("log.metrics_every", cfg.log.metrics_every),
                       ("log.samples_every", cfg.log.samples_every), ("log.print_every", cfg.log.print_every)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 disables), got {value}")
    # eval.every = 0 turns evaluation off (no periodic and no final eval); only then may eval.batches
    # be 0 (nothing held out). Evaluating 0 batches would log a NaN eval loss.
    ev = cfg.eval
    if ev.batches < 0:
        raise ConfigError(f"eval.batches must be >= 1 (or 0 with eval.every=0: no evaluation, nothing held out), "
                          f"got {ev.batches}")
    if ev.every > 0 and ev.batches == 0:
        raise ConfigError(f"eval.batches is 0 but evaluation is on (eval.every={ev.every}): it would average "
                          "no batches; set eval.batches >= 1, or eval.every=0 to turn evaluation off")
    if ev.every > 0 and cfg.data.eval_documents == 0:
        raise ConfigError(f"data.eval_documents is 0 (nothing held out) but evaluation is on (eval.every={ev.every}, "
                          f"eval.batches={ev.batches}); set data.eval_documents to null (just enough) or a "
                          "positive count, or eval.every=0 to turn evaluation off")
    lg = cfg.log
    if lg.spike_window < 2:
        raise ConfigError(f"log.spike_window must be >= 2 steps of history, got {lg.spike_window}")
    _positive("log.spike_zscore", lg.spike_zscore)
    _positive("log.max_new_tokens", lg.max_new_tokens)
    if lg.peak_flops is not None:
        _positive("log.peak_flops", lg.peak_flops)
    if not 0.0 <= lg.repetition_max <= 1.0:
        raise ConfigError(f"log.repetition_max is a share of 4-grams in [0, 1], got {lg.repetition_max}")
    if lg.entropy_floor < 0 or lg.anomaly_dumps_max < 0:
        raise ConfigError("log.entropy_floor and log.anomaly_dumps_max must be >= 0")
    if any(not p.strip() for p in lg.prompts):
        raise ConfigError("log.prompts holds an empty prompt; give text for each, or [] for no samples")
    if t.debug_poison_step < 0:
        raise ConfigError(f"train.debug_poison_step must be >= 0 (0: off), got {t.debug_poison_step}")
    if cfg.mesh.fsdp < 1 or cfg.mesh.data == 0 or cfg.mesh.data < -1:
        raise ConfigError("mesh.fsdp must be >= 1 and mesh.data >= 1 (or -1 for all remaining devices)")
    if cfg.data.source == "local" and not cfg.data.data_files:
        raise ConfigError("data.source is 'local' but data.data_files is empty; give files or globs")
    if cfg.data.source == "builtin":
        ignored = [k for k in ("data_files", "hf_path", "hf_name") if getattr(cfg.data, k)]
        if ignored:  # the builtin corpus would be trained on, not what was asked for
            raise ConfigError(f"data.source is 'builtin' (the embedded corpus), which ignores data.{ignored[0]}; "
                              "set data.source=local for your own files (or fineweb_edu / wikitext for those "
                              "datasets), or drop data." + ignored[0])
    if cfg.data.data_files is not None and any(not f.strip() for f in cfg.data.data_files):
        raise ConfigError("data.data_files holds an empty path; give a file or glob for each entry")
    for key in ("split", "text_column"):
        if not getattr(cfg.data, key).strip():
            default = DataConfig.__dataclass_fields__[key].default
            raise ConfigError(f"data.{key} is empty; give a name (default: {default!r})")
    if cfg.data.eval_documents is not None and cfg.data.eval_documents < 0:
        raise ConfigError("data.eval_documents must be >= 0, or null to hold out just enough for eval.batches")
    for key in ("prefetch_batches", "tokenize_batch"):
        _positive(f"data.{key}", getattr(cfg.data, key))
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0: tokenize in the loader thread), got {cfg.data.num_workers}")
    if cfg.tokenizer.name_or_path == "builtin" and cfg.tokenizer.builtin_vocab_size < 258:
        raise ConfigError("tokenizer.builtin_vocab_size must be >= 258 (256 bytes + BOS/EOS), "
                          f"got {cfg.tokenizer.builtin_vocab_size}")
    if not cfg.tokenizer.name_or_path.strip():
        raise ConfigError("tokenizer.name_or_path is empty; give 'builtin', a hub name or a tokenizer path")
