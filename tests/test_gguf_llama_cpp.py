"""GGUF exports run in real llama.cpp (llama-cpp-python): the same token ids as ours for the same
text, the same logits as our model's forward pass without activation quantization (F32 weights),
and the same next-token choice as our model almost everywhere (TQ weights, where llama.cpp
quantizes activations per block of 256 instead of per token).

These tests need the gguf extra (``make test-gguf``; the first install compiles llama.cpp). Without
it they skip, unless BITNET_REQUIRE_LLAMA_CPP is set (``make test-gguf`` sets it), then they fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import bitnet_jax.model as model_lib
from bitnet_jax.config import Config, ModelConfig, TokenizerConfig
from bitnet_jax.data import load_tokenizer
from bitnet_jax.data.builtin import builtin_documents
from bitnet_jax.export import export_run
from bitnet_jax.generation import MODES, Generator
from bitnet_jax.gguf_export import write_gguf
from bitnet_jax.model import BitNetLM
from bitnet_jax.samples import prompt_ids

try:
    import llama_cpp
except ImportError:
    if os.environ.get("BITNET_REQUIRE_LLAMA_CPP"):
        raise
    pytest.skip("llama-cpp-python is not installed; make test-gguf installs it (the first build takes about "
                "17 minutes on 2 cores) and runs these tests", allow_module_level=True)

pytestmark = pytest.mark.gguf

REPO = Path(__file__).resolve().parents[1]
GGML_TYPE_F32 = 0  # ggml_type of an F32 KV cache (llama.cpp's default is F16)
WINDOW = 128  # the run's seq_len: each held-out window predicts this many tokens
STEPS = 300
# The run: a SwiGLU model (llama.cpp's bitnet graph computes SiLU) whose rows fill whole TQ blocks of
# 256 (hidden 256; intermediate 512 = 2 blocks, so down_proj's activations get two Q8_K scales where
# ours have one), trained long enough that its predictions are confident.
TRAIN_SETS = {"model.hidden_act": "silu", "model.hidden_size": 256, "model.intermediate_size": 512,
              "model.num_attention_heads": 4, "model.num_key_value_heads": 2, "model.num_hidden_layers": 2,
              "model.vocab_size": 1024, "tokenizer.builtin_vocab_size": 1024, "train.steps": STEPS,
              "train.batch_size": 4, "train.seq_len": WINDOW, "optim.warmup_steps": 20, "data.eval_documents": 3,
              "eval.every": 0, "log.samples_every": 0, "log.metrics_every": 0, "checkpoint.every": 1000,
              "log.progress": "false"}
# llama.cpp and XLA sum the same float32 products in different orders (blocked SIMD dot products,
# another softmax and RMSNorm reduction order): about 1e-6 relative per operation. Through two layers
# that is ~1e-5 of logits of magnitude ~10 (1.1e-5 measured); 1e-3 leaves room and is still well
# below what any change of the computation moves: the int8 activation quantizer alone moves this
# model's logits by 5e-2.
LOGIT_ATOL = 1e-3


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def _llama(path: Path, n_ctx: int = 256):
    """llama.cpp with every position's logits and an F32 KV cache; n_ctx: the models' 256 positions."""
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=2, n_threads_batch=2, logits_all=True,
                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)


def _llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """Teacher-forced logits ``[T, V]`` of one sequence, from an empty cache."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], np.float32)


def _llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def _float_activations(monkeypatch) -> None:
    """Our model's forward pass without the int8 activation quantizer (weights still ternary x gamma):
    what llama.cpp computes with F32 weights."""
    monkeypatch.setattr(model_lib, "quantize_activation_ste", lambda x: x.astype(jnp.float32))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    sets = [a for k, v in TRAIN_SETS.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "configs/tiny.yaml", "--runs-dir",
                          str(runs), "--run-id", "silu", *sets], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "silu"


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for weights in ("f32", "tq2_0", "tq1_0"):
        result, step = export_run(run, out / f"{weights}.gguf", fmt="gguf", weights=weights)
        assert step == STEPS
        files[weights] = result.out_dir
    return files


@pytest.fixture(scope="module")
def trained(run):
    from bitnet_jax.checkpoint import load_params

    cfg, params, _ = load_params(run)
    model = BitNetLM(cfg.model, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    return cfg, model, params, load_tokenizer(TokenizerConfig(name_or_path=str(run / "tokenizer")))


@pytest.fixture(scope="module")
def heldout_windows(run, trained) -> list[list[int]]:
    """Two windows of WINDOW + 1 tokens from the held-out documents, packed as in training."""
    fingerprint = json.loads((run / "dataset_fingerprint.json").read_text())
    held = fingerprint["heldout"]["documents"]
    assert held == TRAIN_SETS["data.eval_documents"]
    stream = np.concatenate(trained[3].encode_documents(builtin_documents()[:held])).tolist()
    assert len(stream) >= 2 * WINDOW + 1
    return [stream[i * WINDOW:(i + 1) * WINDOW + 1] for i in range(2)]


def _ours(model, windows) -> np.ndarray:
    return np.asarray(model(jnp.asarray(windows, jnp.int32)))


def _predictions(logits_BxTxV: np.ndarray) -> np.ndarray:
    """The next-token choices that have a held-out target (every position but each window's last)."""
    return logits_BxTxV[:, :-1].argmax(-1)


# --------------------------------------------------------------------------- tokenization

@pytest.mark.parametrize("which", ["builtin", "llama2 tokenizer.model", "llama2 tokenizer.json"])
def test_llama_cpp_tokenizes_like_us_with_bos_as_in_training(which, run, llama_tokenizer_dir, shared_texts, tmp_path):
    if which == "builtin":
        tok_dir = run / "tokenizer"
    else:
        source = llama_tokenizer_dir / ("tokenizer.model" if which.endswith("model") else "hf")
        tok_dir = load_tokenizer(TokenizerConfig(name_or_path=str(source))).save(tmp_path / "tokenizer")
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(tok_dir)))
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, hidden_act="silu"))
    _, params = nnx.split(BitNetLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    write_gguf(cfg, params, tok_dir, tmp_path / "vocab.gguf", weights="f32")
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)

    texts = shared_texts
    theirs = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in texts]
    ours = [prompt_ids(tok, t) for t in texts]
    mismatched = [(t[:60], a[:12], b[:12]) for t, a, b in zip(texts, ours, theirs) if a != b]
    print(f"{which}: {sum(map(len, ours)):,} tokens of {len(texts)} texts, {len(mismatched)} differ")
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ, e.g. {mismatched[:3]}"
    assert sum(map(len, ours)) > 100_000
    assert all(ids[0] == tok.bos_id for ids in theirs)


# --------------------------------------------------------------------------- numerics

def test_f32_export_gives_our_float_activation_logits_and_greedy_text(exports, trained, heldout_windows, monkeypatch):
    cfg, model, params, tok = trained
    llm = _llama(exports["f32"])
    theirs = np.stack([_llama_logits(llm, w) for w in heldout_windows])
    _float_activations(monkeypatch)
    reference = _ours(model, heldout_windows)
    diff = np.abs(theirs - reference).max()
    print(f"f32: max |logit diff| {diff:.3g} (max |logit| {np.abs(reference).max():.3g}), top-1 agreement "
          f"{(_predictions(theirs) == _predictions(reference)).mean():.4f}, file {exports['f32'].stat().st_size:,} B")
    assert diff < LOGIT_ATOL

    graphdef, _ = nnx.split(model, nnx.Param)
    # Made after the patch, this Generator traces the float-activation model (with its KV cache).
    generator = Generator(graphdef, max_positions=cfg.model.max_position_embeddings, eos_id=None)
    # The run's sample prompts, and held-out text cut at four places (a small model's greedy text
    # soon repeats itself; more contexts make more distinct decoding steps).
    prompts = [prompt_ids(tok, text) for text in cfg.log.prompts]
    assert [llm.tokenize(text.encode()) for text in cfg.log.prompts] == prompts  # BOS added, as in training
    prompts += [heldout_windows[i // 2][(i % 2) * 64:(i % 2) * 64 + 24] for i in range(4)]
    continuations = []
    for prompt in prompts:
        ours = generator(params, prompt, [MODES["greedy"]], 32, jax.random.PRNGKey(0)).tokens[0]
        greedy = _llama_greedy(llm, prompt, 32)
        print(f"greedy after {tok.decode(prompt[-8:])!r}: {tok.decode(ours)!r}")
        if greedy != ours:  # only a tie within the summation-order tolerance may part them
            k = next(i for i, (a, b) in enumerate(zip(ours, greedy)) if a != b)
            step = _ours(model, [prompt + ours[:k]])[0, -1]
            assert step[ours[k]] - step[greedy[k]] < LOGIT_ATOL, f"greedy parts at token {k} of {tok.decode(prompt)!r}"
            print(f"  parts at token {k}: a tie within {LOGIT_ATOL}")
            ours, greedy = ours[:k], greedy[:k]
        assert greedy == ours
        assert llm.detokenize(greedy).decode("utf-8", "replace") == tok.decode(ours)  # llama.cpp's own text
        continuations += ours
    assert len(continuations) > 100 and len(set(continuations)) > 5  # real continuations, not one token


def test_tq_exports_choose_our_models_next_token(exports, trained, heldout_windows):
    """Against our model as trained (int8 activations per token): llama.cpp's TQ kernels quantize
    activations per block of 256 (Q8_K), so they are not the same computation; measure agreement."""
    _, model, _, _ = trained
    ours = _ours(model, heldout_windows)
    logits = {}
    for weights in ("tq2_0", "tq1_0"):
        llm = _llama(exports[weights])
        logits[weights] = np.stack([_llama_logits(llm, w) for w in heldout_windows])
    assert _predictions(ours).size == 2 * WINDOW == 256
    for weights, theirs in logits.items():
        agree = (_predictions(theirs) == _predictions(ours)).mean()
        print(f"{weights}: top-1 agreement with our model {agree:.4f} on {_predictions(ours).size} held-out tokens, "
              f"max |logit diff| {np.abs(theirs - ours).max():.3g}, file {exports[weights].stat().st_size:,} B")
        assert agree >= 0.95
    # Both hold the same codes and run the same int8 x ternary products: only float rounding differs.
    assert np.abs(logits["tq1_0"] - logits["tq2_0"]).max() < LOGIT_ATOL


def test_llama_cpp_computes_silu_for_a_relu2_model(tmp_path, monkeypatch):
    """The caveat the export warns about, measured: this llama.cpp ignores bitnet.hidden_activation.
    (If this fails, llama.cpp has learned relu2: update the warning and the README.)"""
    cfg = Config(model=ModelConfig(vocab_size=512, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=512, hidden_act="relu2", initializer_range=0.3),
                 tokenizer=TokenizerConfig(builtin_vocab_size=512))
    tok_dir = load_tokenizer(cfg.tokenizer).save(tmp_path / "tokenizer")
    model = BitNetLM(cfg.model, rngs=nnx.Rngs(3))
    _, params = nnx.split(model, nnx.Param)
    with pytest.warns(UserWarning, match="compute SiLU"):
        write_gguf(cfg, params, tok_dir, tmp_path / "relu2.gguf", weights="f32")
    tokens = np.random.default_rng(0).integers(0, 512, 48).tolist()
    theirs = _llama_logits(_llama(tmp_path / "relu2.gguf"), tokens)

    _float_activations(monkeypatch)
    as_relu2 = np.asarray(model(jnp.asarray([tokens])))[0]
    silu = BitNetLM(cfg.model.model_copy(update={"hidden_act": "silu"}), rngs=nnx.Rngs(3))
    nnx.update(silu, params)
    as_silu = np.asarray(silu(jnp.asarray([tokens])))[0]
    print(f"relu2 model in llama.cpp: max |diff| to relu2 {np.abs(theirs - as_relu2).max():.3g}, "
          f"to silu {np.abs(theirs - as_silu).max():.3g}")
    assert np.abs(theirs - as_silu).max() < LOGIT_ATOL
    assert np.abs(theirs - as_relu2).max() > 100 * LOGIT_ATOL
