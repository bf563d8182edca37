"""The config's sections: every key with its type, bounds, choices and hint, declared on the field
(pydantic, strict), and pydantic's errors told as one line that names the key and what to give.

``config`` adds the rules that tie keys together, YAML files and ``--set``; import from there.
A field's ``hint`` (its pydantic description) ends the message of a value out of bounds, and is the
whole message of a blank text; ``means`` says what the boundary value does ("0 disables").
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import pydantic
from pydantic import Field


def _float(value: Any) -> Any:
    """Ints widen to floats and strings parse (YAML 1.1 reads "1e-3" as a string); an int too large
    for a float becomes infinite, which the finiteness check then refuses with its hint."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return value
    try:
        return float(value)
    except OverflowError:
        return math.inf
    except ValueError:
        return value


Float = Annotated[float, pydantic.BeforeValidator(_float)]
Text = Annotated[str, Field(pattern=r"\S")]  # not blank
Texts = Annotated[list[Text], pydantic.BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]  # "a" = ["a"]
SEED_MAX = 2**31 - 1  # jax keys take int64; train.seed + 2 derives the sampling key


def _field(default: Any, hint: str = "", means: str = "", **bounds: Any) -> Any:
    """A field with its bounds (pydantic's gt/ge/lt/le). A value out of bounds is refused with
    ``{key} must {be in bounds} ({means}), got {value}; {hint}``, a blank text with ``{key} {hint}``."""
    return Field(default, description=hint or None, json_schema_extra={"means": means} if means else None, **bounds)


class _Section(pydantic.BaseModel):
    # strict: no silent casts ("3" is no int, 1.5 or 2.0 no int, 1 no bool); unknown keys refused
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data  # "model:" with nothing under it


class ModelConfig(_Section):
    vocab_size: int = _field(4096, gt=0)  # must be >= the tokenizer's vocabulary
    hidden_size: int = _field(128, gt=0)
    num_hidden_layers: int = _field(2, gt=0)
    num_attention_heads: int = _field(4, gt=0)
    num_key_value_heads: Optional[int] = _field(None, gt=0)  # None: same as num_attention_heads (no GQA)
    intermediate_size: int = _field(256, gt=0)
    max_position_embeddings: int = _field(256, gt=0)
    rope_theta: Float = _field(10000.0, "it is the RoPE base, e.g. 10000.0", gt=0)
    rms_norm_eps: Float = _field(1e-5, "it keeps RMSNorm from dividing by zero, e.g. 1e-5", gt=0)
    hidden_act: Literal["relu2", "silu"] = "relu2"
    initializer_range: Float = _field(0.02, "it is the std of the normal weight init (0 makes every weight "
                                      "zero and nothing learns), e.g. 0.02", gt=0)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cudnn on GPU with bf16, else xla; cudnn needs bf16
    quantization: Literal["bitnet", "none"] = "bitnet"  # none: the dense twin (same layout, plain float linears)
    matmul: Literal["float", "int8"] = "float"  # BitLinear product: float (dequantized, as transformers) or int8 codes

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class TrainConfig(_Section):
    steps: int = _field(300, gt=0)
    batch_size: int = _field(16, gt=0)  # global batch, sequences per optimizer update
    seq_len: int = _field(128, gt=0)
    seed: int = _field(0, "pick a smaller non-negative seed", ge=0, le=SEED_MAX)
    grad_accum: int = _field(1, gt=0)  # micro-batches per update (lax.scan); batch_size must divide by it
    on_nan: Literal["skip", "halt"] = "skip"  # non-finite loss/gradients: skip the update or stop
    # With on_nan skip, the run halts (exit 3, as on_nan halt) once more updates than these were skipped
    # in all / in a row: a run that skips most updates learns nothing and must not end "finished".
    max_skipped: int = _field(100, "it is how many skipped updates the run tolerates in all (to stop at the "
                              "first one, set train.on_nan=halt)", ge=1)
    max_skipped_consecutive: int = _field(10, "it is how many skipped updates in a row the run tolerates (to stop "
                                          "at the first one, set train.on_nan=halt)", ge=1)
    # Testing the NaN path: at this step one token id of the batch is made out-of-vocabulary, so the
    # loss is NaN (0: off). See anomaly.poison_if_due.
    debug_poison_step: int = _field(0, means="0: off", ge=0)


class OptimConfig(_Section):
    peak_lr_1: Float = _field(1.5e-3, gt=0)
    peak_lr_2: Float = _field(1.0e-3, gt=0)
    warmup_steps: int = _field(30, ge=0)
    stage_switch: Optional[int] = None  # None: half of train.steps
    lr_shape: Literal["linear", "cosine"] = "linear"
    min_lr: Float = _field(0.0, means="0: no floor", ge=0)  # and <= min(peak_lr_1, peak_lr_2)
    weight_decay: Float = _field(0.1, "a negative decay grows the weights, e.g. use 0.1", means="0: no decay",
                                 ge=0)  # stage-1 peak; stage 2 is always 0
    wd_shape: Literal["constant", "cosine"] = "constant"
    beta1: Float = _field(0.9, ge=0, lt=1)
    beta2: Float = _field(0.95, ge=0, lt=1)
    eps: Float = _field(1e-8, "it keeps Adam from dividing by zero, e.g. 1e-8", gt=0)
    grad_clip: Float = _field(1.0, "it is the global gradient-norm clip threshold (0 stops learning, below 0 "
                              "flips the gradient), e.g. 1.0; for effectively no clipping give a large value "
                              "such as 1e9", gt=0)


class TokenizerConfig(_Section):
    # "builtin": a byte-level BPE trained on the builtin corpus on first use; else a hub name,
    # a tokenizer.json / tokenizer.model file, or a transformers tokenizer folder.
    name_or_path: Text = _field("builtin", "is empty; give 'builtin', a hub name or a tokenizer path")
    builtin_vocab_size: int = 4096  # >= 258 (256 bytes + BOS/EOS) when name_or_path is builtin


class DataConfig(_Section):
    source: Literal["builtin", "fineweb_edu", "wikitext", "local"] = "builtin"
    data_files: Optional[Texts] = _field(None, "holds an empty path; give a file or glob for each entry")
    hf_path: Optional[str] = None  # hub dataset; None: the source's default
    hf_name: Optional[str] = None  # hub config, e.g. "sample-10BT"; None: the source's default
    split: Text = _field("train", "is empty; give a name (default: 'train')")
    text_column: Text = _field("text", "is empty; give a name (default: 'text')")
    text_unit: Literal["paragraph", "line", "file"] = "paragraph"  # what one document is in a txt file
    repeat: bool = True  # wrap around a finite source instead of stopping
    # The first N documents of the stream are held out for evaluation and never trained on.
    # None: as many leading documents as it takes to fill eval.batches batches.
    eval_documents: Optional[int] = _field(None, means="or null: just enough for eval.batches", ge=0)
    num_workers: int = _field(0, means="0: tokenize in the loader thread", ge=0)  # tokenizer processes
    prefetch_batches: int = _field(8, gt=0)  # bounded queue between the loader thread and the trainer
    tokenize_batch: int = _field(256, gt=0)  # documents per tokenizer call


class CheckpointConfig(_Section):
    every: int = _field(100, means="0 disables", ge=0)
    keep_last: int = _field(2, means="0 disables", ge=0)  # newest N kept besides the mandatory and `every` ones
    async_save: bool = True


class EvalConfig(_Section):
    every: int = _field(100, means="0 disables", ge=0)  # 0: no evaluation at all (neither periodic nor at the end)
    batches: int = 4  # >= 1 while evaluation is on; 0 (only with every 0): nothing held out


class LogConfig(_Section):
    metrics_every: int = _field(100, means="0 disables", ge=0)  # BitNet weight/activation metrics
    samples_every: int = _field(100, means="0 disables", ge=0)
    prompts: Texts = Field(["The meaning of", "A function is", "In Python,"],
                           description="holds an empty prompt; give text for each, or [] for no samples")
    max_new_tokens: int = _field(48, gt=0)
    peak_flops: Optional[Float] = _field(None, gt=0)  # per device, FLOP/s; None: looked up from the device kind
    spike_window: int = _field(100, means="steps of history", ge=2)  # for loss / grad-norm spike checks
    spike_zscore: Float = _field(6.0, gt=0)  # robust z-score (median / MAD of log value) a spike must exceed
    entropy_floor: Float = _field(0.5, ge=0)  # nats; a typical-mode sample below it is an entropy_collapse anomaly
    repetition_max: Float = _field(0.5, "it is a share of repeated 4-grams in a sample", ge=0, le=1)
    anomaly_dumps_max: int = _field(50, ge=0)  # anomalies/ folders per event kind at most (past it: TensorBoard only)
    progress: bool = True  # tqdm bar on stderr (shown only when stderr is a terminal)
    print_every: int = _field(100, means="0: only the lines every 60 s", ge=0)  # a progress line every N steps


class MeshConfig(_Section):
    data: int = -1  # devices on the data axis, >= 1; -1: all devices not used by fsdp
    fsdp: int = _field(1, ge=1)


class Config(_Section):
    name: str = "tiny"
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)

    @property
    def stage_switch(self) -> int:
        """The first step of stage 2 (the resolved ``optim.stage_switch``): half the run when null
        (a one-step run has its single step in stage 1)."""
        s = self.optim.stage_switch
        return max(self.train.steps // 2, 1) if s is None else s

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.seq_len

    @property
    def total_tokens(self) -> int:
        return self.train.steps * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


SECTIONS: dict[str, type[_Section]] = {k: f.annotation for k, f in Config.model_fields.items() if k != "name"}


# --------------------------------------------------------------------------- pydantic errors, told as ours

def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin is Union:
        return " | ".join(map(_type_name, args))
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _item_type(tp: Any) -> Any:
    """The item type of the list inside ``tp`` (through Optional and Annotated), or None."""
    if get_origin(tp) is list:
        return get_args(tp)[0]
    return next((t for t in map(_item_type, get_args(tp)) if t is not None), None)


def _number(v: Any) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _bounds(field: Any, violated: dict[str, Any]) -> str:
    b = {k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)} | violated
    if "ge" in b and ("le" in b or "lt" in b):
        return f"lie in [{_number(b['ge'])}, " + (f"{_number(b['le'])}]" if "le" in b else f"{_number(b['lt'])})")
    if "gt" in b:
        return "be positive" if b["gt"] == 0 else f"be > {_number(b['gt'])}"
    return f"be >= {_number(b['ge'])}"


def _message(err: dict[str, Any]) -> str:
    """One pydantic error (loc, type, input, ctx) as this project says it."""
    loc, kind, value = err["loc"], err["type"], err["input"]
    if kind in ("extra_forbidden", "invalid_key"):
        owner = SECTIONS[loc[0]] if len(loc) > 1 else Config
        where = loc[0] if len(loc) > 1 else "top level"
        return f"unknown config key {'.'.join(map(str, loc))} (in {where}); valid keys: {', '.join(owner.model_fields)}"
    if kind == "model_type":
        if not loc:
            return f"the config: expected a mapping of keys (name, model, train, ...), got {_short(value)}"
        keys = ", ".join(list(SECTIONS[loc[0]].model_fields)[:2])
        return (f"{loc[0]}: expected a section (a mapping of keys such as {keys}), got {_short(value)}; "
                f"give {loc[0]}'s keys under it, or leave it out for the defaults")
    owner, name = (SECTIONS[loc[0]], loc[1]) if len(loc) > 1 else (Config, loc[0])
    field, key = owner.model_fields[name], ".".join(map(str, loc[:2]))
    hint, means = field.description, (field.json_schema_extra or {}).get("means")
    if kind == "finite_number":
        default = "null" if field.default is None else repr(field.default)
        return (f"{key}: expected a finite number, got {_short(value)}; give a real number (NaN and infinity "
                f"are not), e.g. the default {default}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return (f"{key} must {_bounds(field, err['ctx'])}" + (f" ({means})" if means else "")
                + f", got {value}" + (f"; {hint}" if hint else ""))
    if kind == "string_pattern_mismatch":
        return f"{key} {hint}"
    tp = field.annotation
    if len(loc) > 2:  # an item of a list
        tp, key = _item_type(tp), f"{key}[{loc[2]}]"
    return f"{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})"


_UNKNOWN = ("extra_forbidden", "invalid_key")


def _errors(data: Any) -> tuple[Config | None, list[dict[str, Any]]]:
    """The parsed config, or None and pydantic's errors (unknown keys first: the likeliest typo)."""
    try:
        return Config.model_validate(data), []
    except pydantic.ValidationError as e:
        first = lambda err: (err["type"] not in _UNKNOWN, str(err["loc"][-1]) if err["type"] in _UNKNOWN else "")  # noqa: E731
        return None, sorted(e.errors(include_url=False), key=first)


def check(data: Any) -> tuple[Config | None, list[str]]:
    """``(config, [])`` when every field of ``data`` has its type, bounds and choice, else
    ``(None, messages)``, the likeliest mistake first. Cross-field rules are ``config``'s."""
    cfg, errors = _errors(data)
    return cfg, [_message(err) for err in errors]


def check_lenient(data: dict[str, Any]) -> tuple[Config, frozenset[str], list[str]]:
    """``data`` read as far as it can be: an unknown key is dropped, and a value (or section) that
    does not parse falls back to its default. Returns the config, the dotted keys that fell back,
    and a note for each thing dropped."""
    data, unread, notes = copy.deepcopy(data), set(), []
    while True:
        cfg, errors = _errors(data)
        if cfg is not None:
            return cfg, frozenset(unread), notes
        for err in errors:
            loc = err["loc"][:2]
            parent = data[loc[0]] if len(loc) == 2 else data
            if loc[-1] not in parent:  # an earlier error of this pass dropped it (each pass drops one at least)
                continue
            del parent[loc[-1]]
            key = ".".join(map(str, loc))
            if err["type"] in _UNKNOWN:
                notes.append(f"{key} is not a key of this version; ignored")
                continue
            keys = SECTIONS[key].model_fields if key in SECTIONS else [None]
            unread.update(f"{key}.{k}" if k else key for k in keys)
            notes.append(f"{_message(err)}; read as the default")
