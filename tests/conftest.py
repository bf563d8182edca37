"""Shared test setup: offline hub, CPU JAX, and the location of the shared real data."""

import os
from pathlib import Path

# Nothing in the tests may reach the Hugging Face hub; these must be set before the libraries load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_train_args(steps: int, checkpoint_every: int) -> list[str]:
    """train.py's arguments for a small end-to-end run on CPU (tests/test_resume.py,
    tests/test_faults_checkpoint.py): configs/tiny.yaml shrunk further, ``steps`` steps, a checkpoint
    every ``checkpoint_every``; no eval, periodic metrics, samples or progress bar."""
    return ["--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
            "--set", f"train.steps={steps}", "--set", f"checkpoint.every={checkpoint_every}",
            "--set", "optim.warmup_steps=5", "--set", "model.hidden_size=64", "--set", "model.intermediate_size=128",
            "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "eval.every=0",
            "--set", "log.progress=false", "--set", "log.metrics_every=0", "--set", "log.samples_every=0",
            "--no-eval"]


def shared_data_dir() -> Path | None:
    """``$BITNET_TEST_DATA`` or ``../shared/data`` beside the repository, if present."""
    env = os.environ.get("BITNET_TEST_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared test data not found: set BITNET_TEST_DATA or place it at ../shared/data")
    return path


@pytest.fixture(scope="session")
def llama_tokenizer_dir(shared_data) -> Path:
    return shared_data / "llama2_tokenizer"


@pytest.fixture(scope="session")
def shared_texts(shared_data) -> list[str]:
    """FineWeb-Edu documents, WikiText lines, Shakespeare chunks and tokenizer edge cases."""
    import csv

    csv.field_size_limit(10**9)
    with open(shared_data / "fineweb_edu_text_sample" / "training_data.csv", newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    with open(shared_data / "wikitext" / "wikitext-2-raw.wiki.test.raw", encoding="utf-8", newline="") as f:
        texts += [line.rstrip("\r\n") for line in f]
    shakespeare = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    texts += [shakespeare[i:i + 4000] for i in range(0, len(shakespeare), 4000)]
    texts += ["", " ", "  two leading spaces", " Hello world", "<s> literal </s> and <unk>",
              "nbsp\u00a0here", "emoji 😀\ttab\n\nnewlines", "日本語のテキスト", "trailing  "]
    return texts
