"""Export a saved step to one GGUF file that llama.cpp runs with its ``bitnet`` architecture.

The file is written directly with the ``gguf`` package (``pip install -e '.[gguf]'``), not through
llama.cpp's converter, which knows neither transformers' sub-norm names nor this project's layout.

What llama.cpp's ``bitnet`` graph computes, and so what the file holds:

- tensors ``token_embd`` (also the tied LM head), ``output_norm``, and per block ``attn_norm``,
  ``attn_q/k/v/output``, ``attn_sub_norm``, ``ffn_norm``, ``ffn_gate/up/down``, ``ffn_sub_norm``;
  NEOX RoPE (``rotate_half``, ours), grouped-query attention, RMSNorm with our eps;
- each projection as its ternary codes ``t = clip(round(W / gamma), -1, 1)`` (``[out, in]``, the
  input dimension contiguous) plus an F32 ``.scale`` tensor of shape {1} holding gamma, which
  llama.cpp multiplies into the matmul's output. ``tq2_0`` (2 bits per code) and ``tq1_0`` (1.6 bits)
  store blocks of 256 codes with an fp16 block scale; the codes' block absmax is 1, so every block
  scale is exactly 1.0 and the export is lossless. ``f32`` stores the same codes as floats;
- norms in F32; the embedding in F32 or F16 (``--embeddings``).

What differs from bitnet-jax: llama.cpp does not quantize activations per token. With F32 weights it
multiplies float activations; with TQ weights it quantizes activations to int8 per block of 256
values (Q8_K), so rows longer than 256 (hidden 768: 3 blocks) get finer scales than ours. And the
``bitnet`` graph hard-codes a SiLU gate: a ``relu2`` model is written with
``bitnet.hidden_activation = relu2`` but computes SiLU in llama.cpp versions that ignore that key.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from bitnet_jax.config import Config, ConfigError, ModelConfig

WEIGHT_TYPES = ("tq2_0", "tq1_0", "f32")
EMBEDDING_TYPES = ("f32", "f16")
ARCH = "bitnet"
TQ_BLOCK = 256  # values per TQ1_0 / TQ2_0 block (and per Q8_K activation block)

# our parameter path below layers[i] -> llama.cpp's tensor name below blk.{i}
_BLOCK_TENSORS = {
    ("input_layernorm", "weight"): "attn_norm",
    ("self_attn", "q_proj", "weight"): "attn_q",
    ("self_attn", "k_proj", "weight"): "attn_k",
    ("self_attn", "v_proj", "weight"): "attn_v",
    ("self_attn", "o_proj", "weight"): "attn_output",
    ("self_attn", "attn_sub_norm", "weight"): "attn_sub_norm",
    ("post_attention_layernorm", "weight"): "ffn_norm",
    ("mlp", "gate_proj", "weight"): "ffn_gate",
    ("mlp", "up_proj", "weight"): "ffn_up",
    ("mlp", "down_proj", "weight"): "ffn_down",
    ("mlp", "ffn_sub_norm", "weight"): "ffn_sub_norm",
}


class GGUFExportError(ConfigError):
    """A GGUF export that cannot be done; the message says what to change."""


class LlamaCppWarning(UserWarning):
    """Something llama.cpp will compute differently from this model."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install -e '.[gguf]' "
                              "(or make test-gguf)") from None
    return gguf


def gguf_problems(m: ModelConfig, weights: str, embeddings: str) -> list[str]:
    """Why this model cannot be written with these types (empty: it can). Config only, no arrays."""
    problems = []
    if weights not in WEIGHT_TYPES:
        problems.append(f"unknown --weights {weights!r}; expected one of {', '.join(WEIGHT_TYPES)}")
    if embeddings not in EMBEDDING_TYPES:
        problems.append(f"unknown --embeddings {embeddings!r}; expected one of {', '.join(EMBEDDING_TYPES)}")
    if weights.startswith("tq"):
        rows = {"hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size}
        bad = [f"{k} {v}" for k, v in rows.items() if v % TQ_BLOCK]
        if bad:
            problems.append(f"{weights} stores each weight row in blocks of {TQ_BLOCK} values, but "
                            f"{' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a multiple of "
                            f"{TQ_BLOCK}; use --weights f32")
    return problems


def check_gguf_export(cfg: Config, tokenizer_dir: str | Path, weights: str, embeddings: str):
    """Every check that needs no arrays: the package, the types against the shapes, the tokenizer.
    Returns the run's vocabulary for the file (a ``GGUFVocab``)."""
    from bitnet_jax.data import DataError
    from bitnet_jax.data.tokenizer import load_run_tokenizer
    from bitnet_jax.gguf_vocab import gguf_vocab

    _gguf()
    problems = gguf_problems(cfg.model, weights, embeddings)
    if problems:
        raise GGUFExportError("; ".join(problems))
    try:
        tok = load_run_tokenizer(Path(tokenizer_dir))
    except DataError as e:
        raise GGUFExportError(str(e)) from None
    return gguf_vocab(tokenizer_dir, tok, cfg.model.vocab_size)


def relu2_warning(m: ModelConfig) -> str | None:
    if m.hidden_act != "relu2":
        return None
    return ("this model's MLP uses relu2 (squared ReLU): the file says so (bitnet.hidden_activation), "
            "but llama.cpp versions that ignore that key compute SiLU, and their output is then wrong")


def gguf_tensors(params, weights: str = "tq2_0", embeddings: str = "f32"):
    """Yields ``(name, array, ggml_type)`` for every tensor, in file order. ``array`` is float32 (or
    float16) in numpy's row-major ``[out, in]`` order, which GGUF lists as ``{in, out}``; ``ggml_type``
    is None for a plain F32/F16 array, else the type to quantize ``array`` to."""
    import jax.numpy as jnp
    from flax import nnx

    from bitnet_jax.quant import ternary

    gguf = _gguf()
    qtype = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}.get(weights)
    for path, var in nnx.to_flat_state(params):
        path = tuple(path)
        value = np.asarray(var[...], dtype=np.float32)
        if path == ("embed_tokens",):
            yield "token_embd.weight", value.astype(np.float16 if embeddings == "f16" else np.float32), None
        elif path == ("norm", "weight"):
            yield "output_norm.weight", value, None
        elif path[0] == "layers" and path[2:] in _BLOCK_TENSORS:
            name = f"blk.{int(path[1])}.{_BLOCK_TENSORS[path[2:]]}"
            if value.ndim == 1:
                yield f"{name}.weight", value, None
                continue
            t, gamma = ternary(jnp.asarray(value))
            codes = np.asarray(t, np.float32).T + 0.0  # [in, out] -> [out, in]; + 0.0 turns -0.0 into 0.0
            yield f"{name}.weight", np.ascontiguousarray(codes), qtype
            yield f"{name}.scale", np.asarray([gamma], np.float32), None
        else:
            raise GGUFExportError(f"parameter {'/'.join(map(str, path))} has no place in llama.cpp's bitnet "
                                  "architecture; this model is not the BitNet layout the export knows")


def _add_metadata(writer, cfg: Config, weights: str, source: str | None) -> None:
    gguf = _gguf()
    m = cfg.model
    writer.add_name(cfg.name)
    if source:
        writer.add_description(f"BitNet b1.58 exported by bitnet-jax from {source}")
    file_type = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                 "f32": gguf.LlamaFileType.ALL_F32}  # the projections' type; the embedding may be F16
    writer.add_file_type(file_type[weights])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(m.vocab_size)
    writer.add_context_length(m.max_position_embeddings)
    writer.add_embedding_length(m.hidden_size)
    writer.add_block_count(m.num_hidden_layers)
    writer.add_feed_forward_length(m.intermediate_size)
    writer.add_head_count(m.num_attention_heads)
    writer.add_head_count_kv(m.kv_heads)
    writer.add_rope_dimension_count(m.head_dim)
    writer.add_rope_freq_base(m.rope_theta)
    writer.add_layer_norm_rms_eps(m.rms_norm_eps)
    writer.add_string(f"{ARCH}.hidden_activation", m.hidden_act)


def write_gguf(cfg: Config, params, tokenizer_dir: str | Path, out_file: str | Path, *,
               weights: str = "tq2_0", embeddings: str = "f32", source: str | None = None) -> int:
    """Writes ``params`` (an ``nnx.State`` of the model's Params) and the run's tokenizer to
    ``out_file``; returns its size in bytes. The caller checks the destination. The file is written
    beside its destination and renamed at the end, so an interrupted export leaves no half file."""
    gguf = _gguf()
    vocab = check_gguf_export(cfg, tokenizer_dir, weights, embeddings)
    if (message := relu2_warning(cfg.model)) is not None:
        warnings.warn(message, LlamaCppWarning, stacklevel=2)

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".{out_file.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(staging), ARCH)
    try:
        _add_metadata(writer, cfg, weights, source)
        vocab.write_to(writer)
        for name, array, qtype in gguf_tensors(params, weights, embeddings):
            if qtype is None:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out_file)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    return out_file.stat().st_size
