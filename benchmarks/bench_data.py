"""Loader throughput: packed training tokens per second, LLaMA-2 tokenizer, FineWeb-Edu text.

    .venv/bin/python benchmarks/bench_data.py [--seconds 8] [--batch 32] [--seq-len 1024]

Measures the data pipeline alone (no model): ``build_train_loader`` over FineWeb-Edu-shaped parquet
files built from the shared sample (150 real documents, written 10 times over 4 files so an epoch
is about 1M tokens), ``next()`` in a loop after a warm-up. Each case runs in its own process so the
tokenizer's thread setting (``TOKENIZERS_PARALLELISM``) takes effect. Prints a table: tokens/s in
total and per core used. The goal is at least 100k tokens/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shared_data() -> Path:
    env = os.environ.get("BITNET_TEST_DATA")
    for p in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if p.is_dir():
            return p
    sys.exit("shared data not found: set BITNET_TEST_DATA or place it at ../shared/data")


def make_corpus(folder: Path, copies: int = 10, files: int = 4) -> list[str]:
    import pyarrow.parquet as pq

    from bitnet_jax.data.make_fineweb_fixture import fineweb_table, read_texts

    texts = read_texts(shared_data() / "fineweb_edu_text_sample" / "training_data.csv") * copies
    per = -(-len(texts) // files)
    paths = []
    for i in range(files):
        path = folder / f"fineweb-{i:05d}.parquet"
        pq.write_table(fineweb_table(texts[i * per:(i + 1) * per]), path)
        paths.append(str(path))
    return paths


def run_case(files: list[str], workers: int, batch: int, seq_len: int, seconds: float, tokenizer_only: bool) -> dict:
    """One measurement, in this process."""
    from bitnet_jax.config import Config, DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
    from bitnet_jax.data import build_train_loader, load_tokenizer

    tok = load_tokenizer(TokenizerConfig(name_or_path=str(shared_data() / "llama2_tokenizer")))
    if tokenizer_only:
        from bitnet_jax.data.make_fineweb_fixture import read_texts

        texts = read_texts(shared_data() / "fineweb_edu_text_sample" / "training_data.csv")
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for i in range(0, len(texts), 256):
                tokens += sum(a.shape[0] for a in tok.encode_documents(texts[i:i + 256]))
        return {"tokens_per_s": tokens / (time.perf_counter() - start)}
    cfg = Config(model=ModelConfig(vocab_size=32000, max_position_embeddings=seq_len),
                 train=TrainConfig(batch_size=batch, seq_len=seq_len), eval=EvalConfig(every=0, batches=0),
                 data=DataConfig(source="fineweb_edu", data_files=files, num_workers=workers, prefetch_batches=8))
    with build_train_loader(cfg, tok) as loader:
        for _ in range(3):  # warm-up: thread start, worker start, first files
            next(loader)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(loader)
            n += 1
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": n * batch * seq_len / elapsed, "batches": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.case:
        spec = json.loads(args.case)
        print(json.dumps(run_case(spec["files"], spec["workers"], args.batch, args.seq_len, args.seconds,
                                  spec.get("tokenizer_only", False))))
        return

    cores = os.cpu_count() or 1
    cases = [  # (label, workers, TOKENIZERS_PARALLELISM, cores used, tokenizer only)
        ("tokenizer alone, 1 thread", 0, "false", 1, True),
        ("loader, in-thread tokenizer, 1 thread", 0, "false", 1, False),
        (f"loader, in-thread tokenizer, {cores} threads", 0, "true", cores, False),
        (f"loader, {cores} tokenizer processes", cores, "false", cores, False),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        files = make_corpus(Path(tmp))
        rows = []
        for label, workers, parallel, used, tok_only in cases:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": parallel, "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
            spec = json.dumps({"files": files, "workers": workers, "tokenizer_only": tok_only})
            out = subprocess.run([sys.executable, __file__, "--case", spec, "--seconds", str(args.seconds),
                                  "--batch", str(args.batch), "--seq-len", str(args.seq_len)],
                                 env=env, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((label, used, result["tokens_per_s"]))

    print(f"\nData loader throughput: LLaMA-2 tokenizer, FineWeb-Edu text, batch {args.batch} x "
          f"{args.seq_len}+1, {cores} cores on this machine\n")
    print(f"| {'case':<44} | {'cores':>5} | {'tokens/s total':>14} | {'tokens/s per core':>17} |")
    print(f"|{'-' * 46}|{'-' * 7}|{'-' * 16}|{'-' * 19}|")
    for label, used, tps in rows:
        print(f"| {label:<44} | {used:>5} | {tps:>14,.0f} | {tps / used:>17,.0f} |")
    print("\ngoal: >= 100,000 tokens/s per core")


if __name__ == "__main__":
    main()
