"""Export a saved step to a Hugging Face ``BitNetForCausalLM`` folder that transformers loads, or to
one GGUF file that llama.cpp runs.

``python -m bitnet_jax.export RUN_DIR [--step N] --out DIR [--format online|packed] [--force]``
``python -m bitnet_jax.export RUN_DIR [--step N] --out FILE.gguf --format gguf [--weights tq2_0|tq1_0|f32]
[--embeddings f32|f16] [--force]`` (the file's layout: ``gguf_export.py``)

Formats (both hold ``config.json``, ``generation_config.json``, ``model.safetensors``, the run's
tokenizer files and a short ``README.md``):

- ``online``: the float32 master weights; transformers quantizes them on every forward pass
  (``quantization_mode: online``), exactly as training did. Same logits as our model.
- ``packed``: the ternary weights, 4 per byte in transformers' ``pack_weights`` layout, each with its
  ``weight_scale`` (gamma, bfloat16 ``[1]``); embedding and norms in bfloat16
  (``quantization_mode: offline``). About a fifth of the size; logits within bfloat16 rounding.

The folder is written beside its destination and moved into place at the end, so an interrupted
export never leaves a half-written model folder behind. Its tokenizer adds BOS to a text, as the
training packer did (``[BOS] + ids + [EOS]`` per document), so ``tok(prompt).input_ids`` is the prompt
the model saw in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from bitnet_jax.config import Config, ConfigError
from bitnet_jax.gguf_export import LlamaCppWarning

FORMATS = ("online", "packed")
GGUF = "gguf"
WEIGHTS_FILE = "model.safetensors"


class ExportError(ConfigError):
    """An export that cannot be done. The message says what to change (a ConfigError, so that
    checkpoint and tokenizer errors, also ConfigErrors, reach the user the same way)."""


@dataclasses.dataclass
class ExportResult:
    out_dir: Path  # the folder written (for GGUF: the file)
    fmt: str
    file_bytes: dict[str, int]  # file name -> size in bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.file_bytes.values())


# --------------------------------------------------------------------------- checks (before compute)

def check_out_dir(out_dir: Path, force: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuses a destination that exists and is not empty (unless ``force``), that is a file, or
    that is, holds, or lies inside a ``protected`` folder (the run directory: --force must never
    delete checkpoints)."""
    out = out_dir.resolve()
    for p in protected:
        p = p.resolve()
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise ExportError(f"--out {out_dir} overlaps the run directory {p}; export to a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out_dir} is a file; give a folder path (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out_dir} exists and is not empty; choose a new folder, or pass --force "
                          "to replace its contents")


def check_out_file(out_file: Path, force: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuses a GGUF destination that is a folder, that exists (unless ``force``), or that lies inside
    a ``protected`` folder (the run directory)."""
    out = out_file.resolve()
    for p in protected:
        if out.is_relative_to(p.resolve()):
            raise ExportError(f"--out {out_file} is inside the run directory {p}; export to a file outside it")
    if out.is_dir():
        raise ExportError(f"--out {out_file} is a folder; --format gguf writes one file, e.g. --out model.gguf")
    if out.exists() and not force:
        raise ExportError(f"--out {out_file} exists; choose a new file name, or pass --force to replace it")


def check_bitnet(cfg: Config) -> None:
    """Refuses the dense twin: every export format is a BitNet layout, whose readers (transformers'
    BitNet quantization, bitnet.cpp) would quantize its plain float weights to ternary ones."""
    if cfg.model.quantization != "bitnet":
        raise ExportError(f"this checkpoint is a dense twin (model.quantization: {cfg.model.quantization}), and "
                          "every export format here is BitNet's: transformers or bitnet.cpp would quantize its "
                          "float weights to ternary ones and compute a different model; read its float32 "
                          "weights with bitnet_jax.checkpoint.load_params instead")


def check_format(cfg: Config, fmt: str) -> None:
    from bitnet_jax.hf import packing_problems

    check_bitnet(cfg)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS + (GGUF,))}")
    problems = packing_problems(cfg.model) if fmt == "packed" else []
    if problems:
        raise ExportError(f"the packed format stores 4 output rows per byte, so every projection's output "
                          f"size must be divisible by 4, but {', '.join(problems)}; use --format online")


def load_checked_tokenizer(tokenizer_dir: Path, cfg: Config):
    """The run's tokenizer, checked against the model's vocabulary."""
    from bitnet_jax.data import DataError
    from bitnet_jax.data.tokenizer import load_run_tokenizer

    try:
        tok = load_run_tokenizer(tokenizer_dir)
    except DataError as e:
        raise ExportError(str(e)) from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ExportError(f"the tokenizer in {tokenizer_dir} has {tok.vocab_size} tokens but the model only "
                          f"{cfg.model.vocab_size}; this tokenizer does not belong to this checkpoint")
    return tok


# --------------------------------------------------------------------------- writing

def _weights(params, fmt: str) -> dict[str, np.ndarray]:
    from bitnet_jax.hf import hf_packed_state_dict, hf_state_dict

    return hf_state_dict(params) if fmt == "online" else hf_packed_state_dict(params)


def _model_card(cfg: Config, fmt: str, source: str | None, tok) -> str:
    from bitnet_jax.model import count_params

    m = cfg.model
    prompt = "ids = tok('The meaning of', return_tensors='pt').input_ids" + (
        "" if tok.bos_id is None else "  # BOS first, as in training")
    dtype_note = ([] if fmt == "online" else [
        "transformers runs this folder in bfloat16, its stored dtype. (In transformers 5.24, loading it with",
        "`dtype=torch.float32` leaves the embedding in bfloat16 and the forward pass fails.)", ""])
    lines = [
        f"# {cfg.name} (BitNet b1.58, exported by bitnet-jax)",
        "",
        f"- source: {source or 'in-memory parameters'}",
        f"- {count_params(m):,} parameters: hidden {m.hidden_size}, {m.num_hidden_layers} layers, "
        f"{m.num_attention_heads} heads ({m.kv_heads} key/value), intermediate {m.intermediate_size}, "
        f"vocab {m.vocab_size}, {m.hidden_act}, tied embeddings",
        f"- format: {fmt} ("
        + ("float32 master weights, quantized by transformers on every forward pass"
           if fmt == "online" else
           "ternary weights packed 4 per byte with a bfloat16 weight_scale per matrix; embedding and "
           "norms in bfloat16") + ")",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)  # needs `accelerate` installed",
        prompt,
        "out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)",
        "print(tok.decode(out[0]))",
        "```",
        "",
        *dtype_note,
        "llama.cpp: `python -m bitnet_jax.export RUN_DIR --out model.gguf --format gguf` (see the bitnet-jax README).",
        "",
    ]
    return "\n".join(lines)


def _write_tokenizer(tokenizer_dir: Path, tok, out: Path) -> None:
    """Copies the run's tokenizer files into ``out``, with a tokenizer.json that adds BOS to every
    text, as the packer did in training. (A run's own tokenizer.json adds nothing: bitnet-jax encodes
    without special tokens and places BOS/EOS itself. An existing post-processor is replaced, since
    one that adds EOS, or nothing, would give prompts the model never saw.)"""
    from tokenizers import Tokenizer, processors

    for f in sorted(tokenizer_dir.iterdir()):
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    if tok.bos_id is None:
        return
    backend = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = tok.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=[bos, "$A"], pair=[bos, "$A", f"{bos}:1", "$B:1"], special_tokens=[(bos, tok.bos_id)])
    backend.save(str(out / "tokenizer.json"))


def export_model(cfg: Config, params, tokenizer_dir: str | Path, out_dir: str | Path, fmt: str = "online",
                 *, force: bool = False, source: str | None = None) -> ExportResult:
    """Writes the Hugging Face folder for ``params`` (an ``nnx.State`` of the model's Params).

    ``tokenizer_dir`` is a folder written by ``Tokenizer.save`` (a run's ``tokenizer/``); its files
    are copied as they are. ``source`` is a line for the model card (e.g. the run and step).
    """
    from safetensors.numpy import save_file

    from bitnet_jax.hf import hf_config_dict

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    check_format(cfg, fmt)
    check_out_dir(out_dir, force)
    tok = load_checked_tokenizer(tokenizer_dir, cfg)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        save_file(_weights(params, fmt), staging / WEIGHTS_FILE, metadata={"format": "pt"})
        config = hf_config_dict(cfg.model, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                quantization_mode="online" if fmt == "online" else "offline",
                                dtype="float32" if fmt == "online" else "bfloat16")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)) if v is not None}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_tokenizer(tokenizer_dir, tok, staging)
        (staging / "README.md").write_text(_model_card(cfg, fmt, source, tok))
        # safetensors writes through a private (0600) temporary file; give it the mode the others got.
        os.chmod(staging / WEIGHTS_FILE, (staging / "config.json").stat().st_mode & 0o777)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an exported model is for sharing
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or --force
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sizes = {f.name: f.stat().st_size for f in sorted(out_dir.iterdir())}
    return ExportResult(out_dir=out_dir, fmt=fmt, file_bytes=sizes)


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, fmt: str = "online",
               force: bool = False, weights: str = "tq2_0", embeddings: str = "f32") -> tuple[ExportResult, int]:
    """Exports step ``step`` (None: the newest complete one) of a run; returns (result, step).
    ``fmt`` is a Hugging Face format (``out_dir`` a folder) or ``gguf`` (``out_dir`` a file, with
    ``weights`` and ``embeddings`` its tensor types).

    Every check on the arguments runs before the checkpoint is read.
    """
    from bitnet_jax.checkpoint import read_params
    from bitnet_jax.open_step import open_step

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if fmt not in FORMATS + (GGUF,):
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS + (GGUF,))}")
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist; give a folder made by train.py "
                          "(runs/<run_id>)")
    if fmt == GGUF:
        check_out_file(out_dir, force, protected=(run_dir,))
    else:
        check_out_dir(out_dir, force, protected=(run_dir,))
    opened = open_step(run_dir, step)  # the step's metadata only; its arrays are read last
    # The stored config is small JSON: check the format and the tokenizer against it before reading arrays.
    load_checked_tokenizer(run_dir / "tokenizer", opened.cfg)
    check_bitnet(opened.cfg)  # GGUF's BitNet types too
    if fmt == GGUF:
        from bitnet_jax.gguf_export import check_gguf_export

        check_gguf_export(opened.cfg, run_dir / "tokenizer", weights, embeddings)
    else:
        check_format(opened.cfg, fmt)
    cfg, params, loaded = opened.read(read_params)
    source = f"{opened.run_dir} step {loaded}"
    if fmt == GGUF:
        from bitnet_jax.gguf_export import write_gguf

        size = write_gguf(cfg, params, run_dir / "tokenizer", out_dir, weights=weights, embeddings=embeddings,
                          source=source)
        return ExportResult(out_dir=out_dir, fmt=f"gguf, {weights} weights, {embeddings} embedding",
                            file_bytes={out_dir.name: size}), loaded
    result = export_model(cfg, params, run_dir / "tokenizer", out_dir, fmt, force=force, source=source)
    return result, loaded


# --------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bitnet_jax.gguf_export import EMBEDDING_TYPES, WEIGHT_TYPES

    p = argparse.ArgumentParser(prog="python -m bitnet_jax.export",
                                description="Export a checkpoint to a Hugging Face BitNet folder or a GGUF file.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder made by train.py (runs/<run_id>)")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the newest complete one)")
    p.add_argument("--out", required=True, help="destination folder (created; must be empty unless --force); "
                   "with --format gguf, the .gguf file")
    p.add_argument("--format", dest="fmt", choices=FORMATS + (GGUF,), default="online",
                   help="online: float32 master weights (default); packed: 2-bit ternary weights + bf16; "
                   "gguf: one file for llama.cpp")
    p.add_argument("--weights", choices=WEIGHT_TYPES,
                   help="gguf: the ternary projections as tq2_0 (2 bits, default), tq1_0 (1.6 bits) or f32")
    p.add_argument("--embeddings", choices=EMBEDDING_TYPES,
                   help="gguf: the embedding (and tied LM head) as f32 (default) or f16")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out folder "
                   "(gguf: an existing file)")
    args = p.parse_args(argv)
    given = [f"--{k}" for k in ("weights", "embeddings") if getattr(args, k) is not None]
    if args.fmt != GGUF and given:
        p.error(f"{' and '.join(given)} only apply to --format gguf")
    args.weights, args.embeddings = args.weights or WEIGHT_TYPES[0], args.embeddings or EMBEDDING_TYPES[0]
    return args


def _size(n: int) -> str:
    if n < 2**10:
        return f"{n} B"
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LlamaCppWarning)
            result, step = export_run(args.run_dir, args.out, step=args.step, fmt=args.fmt, force=args.force,
                                      weights=args.weights, embeddings=args.embeddings)
    except ConfigError as e:  # ExportError, CheckpointError, DataError, GGUFExportError
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for w in caught:  # one line each; others go on to Python's usual display
            if issubclass(w.category, LlamaCppWarning):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"exported step {step} of {args.run_dir} ({result.fmt}) to {result.out_dir}:")
    for name, n in result.file_bytes.items():
        print(f"  {name:<28} {_size(n):>12}")
    print(f"  {'total':<28} {_size(result.total_bytes):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
