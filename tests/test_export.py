"""Export to a Hugging Face BitNet folder: transformers loads it, computes our logits, generates our
greedy tokens and tokenizes like the run; bad input is refused before any work; the CLI exports a
real training run."""

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

from bitnet_jax.config import Config, ModelConfig, TokenizerConfig
from bitnet_jax.data import load_tokenizer
from bitnet_jax.export import ExportError, export_model, main
from bitnet_jax.hf import VALUES_PER_BYTE, pack_ternary
from bitnet_jax.model import BitNetLM
from bitnet_jax.quant import ternary

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' BitNet quantizer refuses to load without it

REPO = Path(__file__).resolve().parents[1]
BUILTIN_VOCAB = 512
# Logits of the packed format, which stores embedding, norms and gamma in bfloat16 and which
# transformers runs in bfloat16, may differ from ours (float32 master weights) by this much relative
# to max |logit|. Measured on the test model: 4.7%; any one of those three roundings alone gives 2-4%,
# because the int8 activation quantizer turns a small perturbation into a whole quantization step
# wherever a value sits near a rounding boundary, and attention carries that to later positions.
PACKED_REL_TOL = 0.08


def _cfg(**model) -> Config:
    m = dict(vocab_size=BUILTIN_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, initializer_range=0.05)
    m.update(model)
    return Config(model=ModelConfig(**m), tokenizer=TokenizerConfig(builtin_vocab_size=BUILTIN_VOCAB))


def _model(cfg: Config, seed: int = 0) -> tuple[BitNetLM, nnx.State]:
    """A model with non-trivial norm weights, so a swapped or missing norm shows in the logits."""
    model = BitNetLM(cfg.model, rngs=nnx.Rngs(seed))
    _, params = nnx.split(model, nnx.Param)
    key = jax.random.PRNGKey(seed + 100)
    for _, var in nnx.to_flat_state(params):
        if var[...].ndim == 1:
            key, sub = jax.random.split(key)
            var[...] = 1.0 + 0.3 * jax.random.normal(sub, var[...].shape)
    nnx.update(model, params)
    return model, params


@pytest.fixture(scope="module")
def builtin_tok_dir(tmp_path_factory):
    return load_tokenizer(TokenizerConfig(builtin_vocab_size=BUILTIN_VOCAB)).save(
        tmp_path_factory.mktemp("tok") / "tokenizer")


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _load_hf(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


# --------------------------------------------------------------------------- packing

def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """Inverse of ``hf.pack_ternary``: uint8 ``[out / 4, in]`` -> int8 ``[out, in]`` in {-1, 0, 1}."""
    blocks = [((packed >> (2 * k)) & 3).astype(np.int8) - 1 for k in range(VALUES_PER_BYTE)]
    return np.concatenate(blocks, axis=0)


def test_pack_ternary_equals_transformers_pack_weights():
    from transformers.integrations.bitnet import pack_weights

    t = np.random.default_rng(0).integers(-1, 2, (24, 10)).astype(np.int8)
    ours = pack_ternary(t)
    theirs = pack_weights(torch.from_numpy(t.astype(np.float32))).numpy()  # (it adds 1 in place: a copy)
    assert ours.dtype == np.uint8 and ours.shape == (6, 10)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(unpack_ternary(ours), t)
    # Quarter-row blocks: byte [j, c] holds rows j, j+6, j+12, j+18 in bits 0-1, 2-3, 4-5, 6-7.
    assert ours[2, 3] == sum(int(t[2 + 6 * k, 3] + 1) << (2 * k) for k in range(4))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(t[:6])


# --------------------------------------------------------------------------- online format

def test_online_export_loads_in_transformers_with_our_float32_logits(builtin_tok_dir, tmp_path):
    from transformers.integrations.bitnet import AutoBitLinear

    cfg = _cfg()
    model, params = _model(cfg)
    result = export_model(cfg, params, builtin_tok_dir, tmp_path / "hf", "online")
    out = result.out_dir
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= set(result.file_bytes)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                             "quantization_mode": "online"}
    assert (config["hidden_act"], config["tie_word_embeddings"], config["rope_theta"]) == ("relu2", True, 10000.0)
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(builtin_tok_dir)))
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": tok.bos_id,
                                                                         "eos_token_id": tok.eos_id}

    hf = _load_hf(out)
    assert isinstance(hf.model.layers[1].mlp.down_proj, AutoBitLinear) and hf.model.layers[1].mlp.down_proj.online_quant
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied
    assert hf.dtype == torch.float32

    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, 40)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))
    diff, scale = np.abs(_hf_logits(hf, tokens) - ours).max(), np.abs(ours).max()
    print(f"online: max |logit diff| {diff:.3g}, max |logit| {scale:.3g}, relative {diff / scale:.3g}")
    assert diff < 1e-4 * scale


def test_greedy_generation_equals_transformers_generate(builtin_tok_dir, tmp_path):
    from bitnet_jax.generation import MODES, Generator

    # A wide initialisation spreads the logits, so no step of either greedy path hinges on a near-tie.
    cfg = _cfg(initializer_range=0.3)
    model, params = _model(cfg, seed=5)
    out = export_model(cfg, params, builtin_tok_dir, tmp_path / "hf", "online").out_dir
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(builtin_tok_dir)))
    prompt = [tok.bos_id] + tok.encode("The meaning of")

    graphdef, _ = nnx.split(model, nnx.Param)
    ours = Generator(graphdef, max_positions=cfg.model.max_position_embeddings, eos_id=None)(
        params, prompt, [MODES["greedy"]], 32, jax.random.PRNGKey(0)).tokens[0]

    hf = _load_hf(out)
    hf.generation_config.eos_token_id = None  # 32 tokens, as ours: no early stop
    with torch.no_grad():
        # An explicit mask: without one, generate masks every prompt token equal to the pad id.
        seq = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=32, do_sample=False)
    theirs = seq[0, len(prompt):].tolist()
    assert len(ours) == 32 and theirs == ours
    assert len(set(ours)) > 3  # a real continuation, not one token repeated


# --------------------------------------------------------------------------- packed format

def test_packed_export_holds_ternary_bytes_and_loads_within_bf16_tolerance(builtin_tok_dir, tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file
    from transformers.integrations.bitnet import AutoBitLinear

    from bitnet_jax.hf import hf_state_dict

    cfg = _cfg()
    model, params = _model(cfg)
    online = export_model(cfg, params, builtin_tok_dir, tmp_path / "online", "online")
    packed = export_model(cfg, params, builtin_tok_dir, tmp_path / "packed", "packed")
    config = json.loads((packed.out_dir / "config.json").read_text())
    assert config["quantization_config"]["quantization_mode"] == "offline"
    assert config["torch_dtype"] == "bfloat16"

    # Exactly our ternary values and gamma (bfloat16) for every projection.
    stored = load_file(str(packed.out_dir / "model.safetensors"))
    w = np.asarray(params["layers"][0]["self_attn"]["k_proj"]["weight"][...])  # [in, out]
    t, gamma = ternary(jnp.asarray(w))
    k = stored["model.layers.0.self_attn.k_proj.weight"]
    assert k.dtype == np.uint8 and k.shape == (w.shape[1] // 4, w.shape[0])
    np.testing.assert_array_equal(unpack_ternary(k), np.asarray(t, np.int8).T)
    scale = stored["model.layers.0.self_attn.k_proj.weight_scale"]
    assert scale.shape == (1,) and scale.dtype == ml_dtypes.bfloat16
    assert scale[0] == ml_dtypes.bfloat16(float(gamma))
    assert stored["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    print(f"model.safetensors: online {online.file_bytes['model.safetensors']:,} B, "
          f"packed {packed.file_bytes['model.safetensors']:,} B")
    assert packed.file_bytes["model.safetensors"] < online.file_bytes["model.safetensors"] / 3

    hf = _load_hf(packed.out_dir)
    assert hf.dtype == torch.bfloat16  # transformers runs the packed folder in its stored dtype
    tokens = np.random.default_rng(2).integers(0, cfg.model.vocab_size, (2, 40)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))
    theirs = _hf_logits(hf, tokens)

    # transformers unpacked exactly our ternary values, and holds gamma, embedding and norms as bf16.
    ours_by_name = hf_state_dict(params)
    for name, module in hf.named_modules():
        if isinstance(module, AutoBitLinear):
            t, gamma = ternary(jnp.asarray(ours_by_name[name + ".weight"]))
            np.testing.assert_array_equal(module.weight.detach().float().numpy(), np.asarray(t), err_msg=name)
            assert module.weight_scale.item() == float(ml_dtypes.bfloat16(float(gamma))), name
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.ffn_sub_norm.weight"):
        stored_value = hf.get_parameter(name).detach().float().numpy()
        np.testing.assert_array_equal(stored_value, ours_by_name[name].astype(ml_dtypes.bfloat16).astype(np.float32))

    # Against our float32 model, in bfloat16 as transformers runs it by default: the bf16 tolerance.
    diff, top = np.abs(theirs - ours).max(), np.abs(ours).max()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    print(f"packed (bf16): max |logit diff| {diff:.3g}, relative {diff / top:.3g}, "
          f"mean |diff| {np.abs(theirs - ours).mean():.3g}, argmax agreement {agree:.3f}")
    assert diff < PACKED_REL_TOL * top
    assert agree >= 0.9


def test_packed_format_refuses_output_sizes_not_divisible_by_4(builtin_tok_dir, tmp_path):
    cfg = _cfg(intermediate_size=98)
    _, params = _model(cfg)
    with pytest.raises(ExportError, match="gate_proj / up_proj has 98 outputs"):
        export_model(cfg, params, builtin_tok_dir, tmp_path / "hf", "packed")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("which", ["llama2", "builtin"])
def test_exported_tokenizer_gives_the_runs_ids(which, shared_data, llama_tokenizer_dir, tmp_path, shared_texts):
    from transformers import AutoTokenizer

    name = str(llama_tokenizer_dir / "tokenizer.model") if which == "llama2" else "builtin"
    run_tok = load_tokenizer(TokenizerConfig(name_or_path=name, builtin_vocab_size=BUILTIN_VOCAB))
    tok_dir = run_tok.save(tmp_path / "run" / "tokenizer")  # what train.py keeps in RUN_DIR/tokenizer
    cfg = _cfg(vocab_size=run_tok.vocab_size, hidden_size=16, num_attention_heads=2, num_key_value_heads=None,
               intermediate_size=32)
    _, params = _model(cfg)
    out = export_model(cfg, params, tok_dir, tmp_path / "hf", "online").out_dir

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    texts = shared_texts
    theirs = hf_tok(texts, add_special_tokens=False)["input_ids"]
    ours = run_tok.encode_batch(texts)
    mismatched = [t[:60] for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ, e.g. {mismatched[:3]}"
    assert sum(map(len, ours)) > 100_000
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (run_tok.bos_id, run_tok.eos_id)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (run_tok.bos_id, run_tok.eos_id)


@pytest.mark.parametrize("which", ["llama2", "builtin"])
def test_exported_tokenizer_adds_bos_like_the_training_packer(which, llama_tokenizer_dir, tmp_path):
    """Training packed [BOS] + ids + [EOS]: a plain tokenizer(text) of the export must give [BOS] + ids,
    so a user's model.generate continues from the prompt the model saw (bitnet_jax.samples.prompt_ids)."""
    from transformers import AutoTokenizer

    from bitnet_jax.samples import prompt_ids

    name = str(llama_tokenizer_dir / "tokenizer.model") if which == "llama2" else "builtin"
    run_tok = load_tokenizer(TokenizerConfig(name_or_path=name, builtin_vocab_size=BUILTIN_VOCAB))
    tok_dir = run_tok.save(tmp_path / "run" / "tokenizer")
    cfg = _cfg(vocab_size=run_tok.vocab_size, hidden_size=16, num_attention_heads=2, num_key_value_heads=None,
               intermediate_size=32)
    _, params = _model(cfg)
    out = export_model(cfg, params, tok_dir, tmp_path / "hf", "online").out_dir

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    texts = ["The meaning of", " leading space", "", "<s> literal", "def f(x):\n    return x"]
    assert [hf_tok(t).input_ids for t in texts] == [prompt_ids(run_tok, t) for t in texts]
    assert hf_tok(texts).input_ids[0][0] == run_tok.bos_id
    assert "tok('The meaning of', return_tensors='pt').input_ids" in (out / "README.md").read_text()


def test_exported_files_all_have_the_mode_of_a_new_file(builtin_tok_dir, tmp_path):
    cfg = _cfg()
    _, params = _model(cfg)
    for fmt in ("online", "packed"):
        out = export_model(cfg, params, builtin_tok_dir, tmp_path / fmt, fmt).out_dir
        (tmp_path / "fresh").write_text("")
        fresh = (tmp_path / "fresh").stat().st_mode
        modes = {f.name: oct(f.stat().st_mode) for f in out.iterdir()}
        assert set(modes.values()) == {oct(fresh)}, modes  # safetensors alone used to be 0600


# --------------------------------------------------------------------------- a real run, the CLI

TRAIN_ARGS = ["--config", "configs/tiny.yaml", "--set", "train.steps=10", "--set", "optim.warmup_steps=2",
              "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "model.hidden_size=64",
              "--set", "model.intermediate_size=128", "--set", "model.vocab_size=512",
              "--set", "tokenizer.builtin_vocab_size=512", "--set", "eval.every=0", "--set", "log.samples_every=0",
              "--set", "log.metrics_every=0", "--set", "checkpoint.every=4", "--set", "log.progress=false"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 10-step run of train.py with checkpoints (every 4 steps, the stage switch pair 4/5, the end)."""
    runs = tmp_path_factory.mktemp("runs")
    out = subprocess.run([sys.executable, str(REPO / "train.py"), *TRAIN_ARGS, "--runs-dir", str(runs),
                          "--run-id", "r"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "r"


@pytest.mark.slow
def test_cli_exports_a_real_run_that_transformers_runs(trained_run, tmp_path):
    from bitnet_jax.checkpoint import load_params
    from bitnet_jax.run_dir import complete_steps

    assert complete_steps(trained_run)[-1] == 10
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.export", str(trained_run), "--out",
                          str(tmp_path / "hf")], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exported step 10 of" in out.stdout and "model.safetensors" in out.stdout

    cfg, params, step = load_params(trained_run)
    model = BitNetLM(cfg.model, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(trained_run / "tokenizer")))
    tokens = np.asarray([[tok.bos_id] + tok.encode("def main():\n    return the value of")], np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))
    hf = _load_hf(tmp_path / "hf")
    diff = np.abs(_hf_logits(hf, tokens) - ours).max()
    assert diff < 1e-4 * np.abs(ours).max()
    assert str(trained_run.resolve()) in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.slow
def test_cli_exports_an_older_step_packed(trained_run, tmp_path, capsys):
    from safetensors.numpy import load_file

    from bitnet_jax.checkpoint import load_params

    assert main([str(trained_run), "--step", "4", "--out", str(tmp_path / "hf"), "--format", "packed"]) == 0
    assert "exported step 4 of" in capsys.readouterr().out
    _, params, _ = load_params(trained_run, step=4)
    _, newest, _ = load_params(trained_run)
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    for p, expect_equal in ((params, True), (newest, False)):
        t, _ = ternary(p["layers"][1]["mlp"]["up_proj"]["weight"][...])
        same = np.array_equal(unpack_ternary(stored[name]), np.asarray(t, np.int8).T)
        assert same == expect_equal


@pytest.mark.slow
def test_cli_exports_from_another_directory_with_relative_paths(trained_run, tmp_path):
    """As the README writes it (``runs/<run_id>``): relative to the working directory, not the repo."""
    out_dir = Path(os.path.relpath(tmp_path / "hf", trained_run.parent))
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.export", trained_run.name, "--out", str(out_dir)],
                         cwd=trained_run.parent, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"exported step 10 of {trained_run.name}" in out.stdout
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert f"{trained_run.resolve()} step 10" in (tmp_path / "hf" / "README.md").read_text()


def test_cli_on_a_run_without_a_checkpoint_yet_says_when_it_will_have_one(tmp_path, capsys):
    """What train.py leaves before its first save: config.yaml and an empty checkpoints/."""
    from bitnet_jax import config as config_lib

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = config_lib.from_dict({"train": {"steps": 30}, "optim": {"warmup_steps": 2}, "checkpoint": {"every": 10}})
    (run / "config.yaml").write_text(config_lib.dump(cfg))
    assert main([str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{run} has no checkpoint yet" in err
    assert "every 10 steps (10, 20, ...), at the stage switch (14 and 15) and at the end (30)" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_cli_refuses_bad_input_before_any_work(trained_run, tmp_path, capsys):
    def run(*args) -> str:
        assert main([*map(str, args)]) == 2
        return capsys.readouterr().err

    assert "step 7 is not a complete checkpoint" in run(trained_run, "--step", "7", "--out", tmp_path / "a")
    assert "available steps: 4, 5, 8, 10" in run(trained_run, "--step", "7", "--out", tmp_path / "a")
    assert not (tmp_path / "a").exists()

    no_tokenizer = tmp_path / "no_tokenizer"
    (no_tokenizer / "checkpoints").mkdir(parents=True)
    (no_tokenizer / "checkpoints" / "10").symlink_to(trained_run / "checkpoints" / "10")
    assert "tokenizer folder" in run(no_tokenizer, "--out", tmp_path / "a")

    empty_run = tmp_path / "empty_run"
    (empty_run / "tokenizer").mkdir(parents=True)
    assert "holds no complete checkpoint" in run(empty_run, "--out", tmp_path / "a")
    assert "does not exist" in run(tmp_path / "nope", "--out", tmp_path / "a")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "exists and is not empty" in run(trained_run, "--out", taken)
    assert (taken / "notes.txt").read_text() == "mine"
    assert main([str(trained_run), "--out", str(taken), "--force"]) == 0
    assert not (taken / "notes.txt").exists() and (taken / "model.safetensors").is_file()

    # --force never deletes the run itself.
    assert "overlaps the run directory" in run(trained_run, "--out", trained_run, "--force")
    assert "overlaps the run directory" in run(trained_run, "--out", trained_run / "export", "--force")
    assert (trained_run / "checkpoints" / "10").is_dir()
    assert not list(tmp_path.glob(".*partial*"))  # no staging folders left behind
