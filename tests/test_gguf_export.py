"""GGUF export, read back with the gguf package's own reader: every tensor where llama.cpp's bitnet
architecture looks for it, the ternary codes lossless in TQ2_0 / TQ1_0 / F32 with gamma as an F32
scale, the metadata, the run's tokenizer as a llama.cpp vocabulary, refusals before any work, and
the CLI on a real run. (Running the files in llama.cpp: tests/test_gguf_llama_cpp.py.)"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import jax
from flax import nnx

from bitnet_jax.config import Config, ModelConfig, TokenizerConfig
from bitnet_jax.data import load_tokenizer
from bitnet_jax.gguf_export import GGUFExportError, LlamaCppWarning, write_gguf
from bitnet_jax.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, VocabError, gguf_vocab
from bitnet_jax.model import BitNetLM
from bitnet_jax.quant import ternary

gguf = pytest.importorskip("gguf", reason="the gguf package is in the test extra: make install")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")


def _cfg(**model) -> Config:
    m = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, max_position_embeddings=128, hidden_act="silu")
    m.update(model)
    return Config(name="gguf_test", model=ModelConfig(**m), tokenizer=TokenizerConfig(builtin_vocab_size=VOCAB))


def _params(cfg: Config, seed: int = 0):
    """Params with non-trivial norm weights, so a swapped norm would show."""
    _, params = nnx.split(BitNetLM(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param)
    key = jax.random.PRNGKey(seed + 1)
    for _, var in nnx.to_flat_state(params):
        if var[...].ndim == 1:
            key, sub = jax.random.split(key)
            var[...] = 1.0 + 0.3 * jax.random.normal(sub, var[...].shape)
    return params


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory) -> Path:
    return load_tokenizer(TokenizerConfig(builtin_vocab_size=VOCAB)).save(tmp_path_factory.mktemp("tok") / "tokenizer")


def _read(path: Path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _field(reader, key):
    return reader.fields[key].contents()


# --------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("weights", ["tq2_0", "tq1_0", "f32"])
def test_projections_are_their_ternary_codes_with_gamma_as_an_f32_scale(weights, builtin_dir, tmp_path):
    cfg = _cfg()
    params = _params(cfg)
    size = write_gguf(cfg, params, builtin_dir, tmp_path / "m.gguf", weights=weights)
    assert size == (tmp_path / "m.gguf").stat().st_size
    _, tensors = _read(tmp_path / "m.gguf")

    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(cfg.model.num_hidden_layers):
        expected |= {f"blk.{i}.{n}.weight" for n in PROJECTIONS + NORMS} | {f"blk.{i}.{n}.scale" for n in PROJECTIONS}
    assert set(tensors) == expected

    layer = params["layers"][1]
    ours = {"attn_q": layer["self_attn"]["q_proj"], "attn_k": layer["self_attn"]["k_proj"],
            "attn_output": layer["self_attn"]["o_proj"], "ffn_down": layer["mlp"]["down_proj"]}
    for name, module in ours.items():
        w = module["weight"][...]  # [in, out]
        t, gamma = ternary(w)
        stored = tensors[f"blk.1.{name}.weight"]
        assert stored.tensor_type.name == weights.upper()
        assert [int(n) for n in stored.shape] == list(w.shape)  # GGUF lists {in, out}: numpy [out, in]
        codes = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(w.shape[1], w.shape[0])
        np.testing.assert_array_equal(codes, np.asarray(t).T, err_msg=name)  # lossless, every block scale 1
        scale = tensors[f"blk.1.{name}.scale"]
        assert scale.tensor_type.name == "F32" and [int(n) for n in scale.shape] == [1]
        assert scale.data[0] == np.float32(gamma)
    np.testing.assert_array_equal(tensors["blk.1.ffn_sub_norm.weight"].data, layer["mlp"]["ffn_sub_norm"]["weight"][...])
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, params["norm"]["weight"][...])
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type.name == "F32" and [int(n) for n in embed.shape] == [cfg.model.hidden_size, VOCAB]
    np.testing.assert_array_equal(embed.data, params["embed_tokens"][...])


def test_tq_files_are_a_fraction_of_f32_and_f16_halves_the_embedding(builtin_dir, tmp_path):
    cfg = _cfg()
    params = _params(cfg)
    sizes = {w: write_gguf(cfg, params, builtin_dir, tmp_path / f"{w}.gguf", weights=w) for w in ("f32", "tq2_0", "tq1_0")}
    half = write_gguf(cfg, params, builtin_dir, tmp_path / "f16.gguf", weights="tq2_0", embeddings="f16")
    print("sizes (bytes):", sizes, "tq2_0 + f16 embedding:", half)
    codes = sum(int(np.prod(v[...].shape)) for p, v in nnx.to_flat_state(params) if v[...].ndim == 2 and p[0] == "layers")
    # TQ2_0: 66 bytes per 256 codes, TQ1_0: 54; the rest of the file is the same in all three.
    assert sizes["f32"] - sizes["tq2_0"] == pytest.approx(codes * (4 - 66 / 256), abs=4096)
    assert sizes["tq2_0"] - sizes["tq1_0"] == pytest.approx(codes * 12 / 256, abs=4096)
    assert sizes["tq2_0"] - half == pytest.approx(VOCAB * cfg.model.hidden_size * 2, abs=4096)
    _, tensors = _read(tmp_path / "f16.gguf")
    assert tensors["token_embd.weight"].tensor_type.name == "F16"


def test_metadata_describes_the_model_and_adds_bos_like_the_packer(builtin_dir, tmp_path):
    cfg = _cfg(rope_theta=5000.0, rms_norm_eps=1e-6)
    write_gguf(cfg, _params(cfg), builtin_dir, tmp_path / "m.gguf", source="runs/x step 3")
    reader, _ = _read(tmp_path / "m.gguf")
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(builtin_dir)))
    expect = {"general.architecture": "bitnet", "general.name": "gguf_test", "bitnet.block_count": 2,
              "bitnet.embedding_length": 256, "bitnet.feed_forward_length": 512, "bitnet.attention.head_count": 4,
              "bitnet.attention.head_count_kv": 2, "bitnet.context_length": 128, "bitnet.rope.dimension_count": 64,
              "bitnet.hidden_activation": "silu", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
              "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    assert {k: _field(reader, k) for k in expect} == expect
    assert _field(reader, "bitnet.rope.freq_base") == 5000.0
    assert _field(reader, "bitnet.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert "runs/x step 3" in _field(reader, "general.description")


def test_relu2_warns_in_one_line_that_llama_cpp_may_compute_silu(builtin_dir, tmp_path):
    cfg = _cfg(hidden_act="relu2")
    with pytest.warns(LlamaCppWarning) as caught:
        write_gguf(cfg, _params(cfg), builtin_dir, tmp_path / "relu2.gguf")
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "SiLU" in str(caught[0].message)
    reader, _ = _read(tmp_path / "relu2.gguf")
    assert _field(reader, "bitnet.hidden_activation") == "relu2"
    with warnings.catch_warnings():
        warnings.simplefilter("error", LlamaCppWarning)
        write_gguf(_cfg(), _params(_cfg()), builtin_dir, tmp_path / "silu.gguf")


def test_refuses_what_llama_cpp_cannot_hold_before_writing(builtin_dir, tmp_path):
    small = _cfg(hidden_size=64, intermediate_size=512)
    with pytest.raises(GGUFExportError, match="hidden_size 64 is not a multiple of 256; use --weights f32"):
        write_gguf(small, _params(small), builtin_dir, tmp_path / "a.gguf", weights="tq2_0")
    assert not any(tmp_path.iterdir())
    write_gguf(small, _params(small), builtin_dir, tmp_path / "a.gguf", weights="f32")  # f32 has no blocks
    with pytest.raises(GGUFExportError, match="unknown --weights 'q4_0'"):
        write_gguf(_cfg(), None, builtin_dir, tmp_path / "c.gguf", weights="q4_0")


# --------------------------------------------------------------------------- vocabulary

def test_builtin_tokenizer_becomes_a_byte_level_bpe_vocabulary(builtin_dir):
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(builtin_dir)))
    vocab = gguf_vocab(builtin_dir, tok, VOCAB + 3)
    data = json.loads((builtin_dir / "tokenizer.json").read_text())
    assert (vocab.model, vocab.pre, vocab.scores) == ("gpt2", "gpt-2", None)
    assert vocab.tokens[:VOCAB] == [tok.backend.id_to_token(i) for i in range(VOCAB)]
    assert vocab.merges == [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    assert vocab.types[tok.bos_id] == vocab.types[tok.eos_id] == CONTROL and vocab.types[300] == NORMAL
    assert vocab.tokens[VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 3)]
    assert vocab.types[VOCAB:] == [UNUSED] * 3
    with pytest.raises(VocabError, match="has 512 tokens but the model only 500"):
        gguf_vocab(builtin_dir, tok, 500)


def test_llama2_tokenizer_model_and_its_tokenizer_json_become_sentencepiece_vocabularies(llama_tokenizer_dir, tmp_path):
    from bitnet_jax.data.spm import read_model_proto

    proto = read_model_proto(llama_tokenizer_dir / "tokenizer.model")
    for source in ("tokenizer.model", "hf"):
        tok = load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir / source)))
        run_dir = tok.save(tmp_path / source)  # what train.py keeps in RUN_DIR/tokenizer
        vocab = gguf_vocab(run_dir, tok, 32000)
        assert (vocab.model, vocab.add_space_prefix, vocab.unk_id, vocab.bos_id, vocab.eos_id) == ("llama", True, 0, 1, 2)
        assert vocab.tokens == [p.piece for p in proto.pieces]
        assert vocab.types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE] and vocab.types[13] == BYTE
        assert vocab.types[450] == NORMAL
        if source == "tokenizer.model":  # the scores as SentencePiece has them
            assert vocab.scores == [p.score for p in proto.pieces]
        else:  # minus the rank of the first merge making the piece: "▁ t" is the first merge
            assert vocab.scores[vocab.tokens.index("▁t")] == 0.0
            # Every multi-character piece is made by a merge, and merge priority follows SentencePiece's
            # scores: the same order of merging.
            pieces = [i for i, p in enumerate(proto.pieces) if p.type == NORMAL and len(p.piece) > 1]
            n_merges = len(json.loads((run_dir / "tokenizer.json").read_text())["model"]["merges"])
            assert all(vocab.scores[i] > -n_merges for i in pieces)  # pieces no merge makes score below
            by_priority = sorted(pieces, key=lambda i: -vocab.scores[i])
            spm_scores = [proto.pieces[i].score for i in by_priority]
            assert spm_scores == sorted(spm_scores, reverse=True)


def test_tokenizers_llama_cpp_would_split_differently_are_refused(llama_tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bitnet_jax.data.spm import read_model_proto

    proto = read_model_proto(llama_tokenizer_dir / "tokenizer.model")
    proto.normalizer_spec.remove_extra_whitespaces = True
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(proto.SerializeToString())
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "spm")))
    with pytest.raises(VocabError, match="removes repeated spaces"):
        gguf_vocab(tok.save(tmp_path / "spm_run"), tok, 32000)

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "wp").mkdir()
    wordpiece.save(str(tmp_path / "wp" / "tokenizer.json"))
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "wp")))
    with pytest.raises(VocabError, match="its model is 'WordPiece'.*use --format online or packed"):
        gguf_vocab(tmp_path / "wp", tok, 8)


# --------------------------------------------------------------------------- the CLI on a real run

def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def relu2_run(tmp_path_factory) -> Path:
    """A real 4-step train.py run of a relu2 model whose rows fit TQ blocks (hidden 256)."""
    runs = tmp_path_factory.mktemp("runs")
    args = ["--config", "configs/tiny.yaml", "--runs-dir", str(runs), "--run-id", "r", "--set", "train.steps=4",
            "--set", "optim.warmup_steps=1", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
            "--set", "model.hidden_size=256", "--set", "model.intermediate_size=512", "--set", "model.num_hidden_layers=1",
            "--set", "model.vocab_size=512", "--set", "tokenizer.builtin_vocab_size=512", "--set", "eval.every=0",
            "--set", "log.samples_every=0", "--set", "log.metrics_every=0", "--set", "log.progress=false"]
    out = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "r"


@pytest.mark.slow
def test_cli_writes_a_gguf_file_warning_once_about_relu2(relu2_run, tmp_path):
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.export", str(relu2_run), "--out", "model.gguf",
                          "--format", "gguf", "--weights", "tq1_0"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exported step 4 of" in out.stdout and "model.gguf" in out.stdout
    warning_lines = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "relu2" in warning_lines[0] and "SiLU" in warning_lines[0], out.stderr
    reader, tensors = _read(tmp_path / "model.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "TQ1_0"
    assert str(relu2_run.resolve()) in _field(reader, "general.description")
    (tmp_path / "fresh").write_text("")  # the mode any new file gets here
    assert (tmp_path / "model.gguf").stat().st_mode == (tmp_path / "fresh").stat().st_mode
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.slow
def test_cli_refuses_bad_gguf_destinations_before_any_work(relu2_run, tmp_path, capsys):
    from bitnet_jax.export import main

    def run(*args) -> str:
        assert main([*map(str, args)]) == 2
        return capsys.readouterr().err

    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    assert "exists; choose a new file name, or pass --force" in run(relu2_run, "--out", taken, "--format", "gguf")
    assert taken.read_bytes() == b"mine"
    assert "is a folder" in run(relu2_run, "--out", tmp_path, "--format", "gguf")
    assert "inside the run directory" in run(relu2_run, "--out", relu2_run / "m.gguf", "--format", "gguf", "--force")
    assert main([str(relu2_run), "--out", str(taken), "--format", "gguf", "--weights", "f32", "--force"]) == 0
    assert taken.stat().st_size > 1000
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(relu2_run), "--out", str(tmp_path / "hf"), "--weights", "tq2_0"])
    assert e.value.code == 2 and "--weights only apply to --format gguf" in capsys.readouterr().err
