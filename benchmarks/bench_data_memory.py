"""Loader memory on one very long document: peak RSS and tokens/s over a single-line text file.

    .venv/bin/python benchmarks/bench_data_memory.py [--mb 34] [--tokenizers builtin,llama2]
        [--tokenize-batch 256] [--batch 32] [--seq-len 1024] [--passes 1]

Builds a text file of ``--mb`` MB holding one line (the shared FineWeb-Edu sample, whitespace
squeezed, repeated until the size is reached) in a temporary folder, then, for each tokenizer, runs
``build_train_loader`` in a fresh process over it (``data.source: local``, the default
``text_unit: paragraph``, so the whole file is one document; evaluation off, since the only
document would otherwise be held out). The process reads ``--passes`` passes over the document
(until the loader state's epoch moves on), then reports its own peak resident memory
(``getrusage``), the resident memory before the loader was built (imports, tokenizer), the time
to the first batch and the tokens/s after it. One tokenizer thread (``TOKENIZERS_PARALLELISM=false``),
as ``bench_data.py``'s one-core case.

Issue 14: before pieces (``bitnet_jax/data/pieces.py``) a 1.1 MB paragraph peaked at 8 GB; the
goal is under 1 GB for any document size.
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

from bench_data import shared_data  # this folder is on sys.path; it also puts the repository there


def write_one_line(path: Path, megabytes: float) -> int:
    """One line of real English text of about ``megabytes`` MB; returns its size in bytes."""
    from bitnet_jax.data.make_fineweb_fixture import read_texts

    texts = [" ".join(t.split()) for t in read_texts(shared_data() / "fineweb_edu_text_sample" / "training_data.csv")]
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for t in texts:
                if written >= target:
                    break
                f.write(t + " ")
                written += len(t.encode("utf-8")) + 1
        f.write("\n")
    return path.stat().st_size


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(path: str, tokenizer: str, batch: int, seq_len: int, tokenize_batch: int, passes: int) -> dict:
    """One measurement, in this process."""
    import resource

    from bitnet_jax.config import Config, DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
    from bitnet_jax.data import build_train_loader, load_tokenizer

    name = str(shared_data() / "llama2_tokenizer") if tokenizer == "llama2" else tokenizer
    tok = load_tokenizer(TokenizerConfig(name_or_path=name))
    cfg = Config(model=ModelConfig(vocab_size=max(32000, tok.vocab_size), max_position_embeddings=seq_len),
                 train=TrainConfig(batch_size=batch, seq_len=seq_len), eval=EvalConfig(every=0, batches=0),
                 data=DataConfig(source="local", data_files=[path], tokenize_batch=tokenize_batch))
    before = rss_mb()
    start = time.perf_counter()
    with build_train_loader(cfg, tok) as loader:
        next(loader)
        first = time.perf_counter()
        n = 1
        while loader.state_dict()["position"]["epoch"] < passes:
            next(loader)
            n += 1
        end = time.perf_counter()
    return {"rss_before_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_batch_s": first - start, "batches": n,
            "tokens_per_s": (n - 1) * batch * seq_len / max(end - first, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=34.0, help="size of the one-line file in MB")
    parser.add_argument("--tokenizers", default="builtin,llama2", help="comma-separated: builtin, llama2, or paths")
    parser.add_argument("--tokenize-batch", type=int, default=256, help="data.tokenize_batch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--passes", type=int, default=1, help="passes over the document")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.case:
        spec = json.loads(args.case)
        print(json.dumps(run_case(spec["path"], spec["tokenizer"], args.batch, args.seq_len,
                                  args.tokenize_batch, args.passes)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one_line.txt"
        size = write_one_line(path, args.mb)
        for tokenizer in args.tokenizers.split(","):
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
            spec = json.dumps({"path": str(path), "tokenizer": tokenizer})
            out = subprocess.run([sys.executable, __file__, "--case", spec, "--batch", str(args.batch),
                                  "--seq-len", str(args.seq_len), "--tokenize-batch", str(args.tokenize_batch),
                                  "--passes", str(args.passes)], env=env, capture_output=True, text=True)
            if out.returncode:
                rows.append((tokenizer, None, out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]))
                continue
            rows.append((tokenizer, json.loads(out.stdout.strip().splitlines()[-1]), None))

    print(f"\nLoader memory: one document of {size / 1e6:.1f} MB on one line, data.tokenize_batch "
          f"{args.tokenize_batch}, batch {args.batch} x {args.seq_len}+1, {args.passes} pass(es), 1 tokenizer thread\n")
    print(f"| {'tokenizer':<10} | {'peak RSS MB':>11} | {'RSS before loader MB':>20} | {'first batch s':>13} "
          f"| {'batches':>7} | {'tokens/s':>9} |")
    print(f"|{'-' * 12}|{'-' * 13}|{'-' * 22}|{'-' * 15}|{'-' * 9}|{'-' * 11}|")
    for tokenizer, r, error in rows:
        if r is None:
            print(f"| {tokenizer:<10} | failed: {error[0]} |")
            continue
        print(f"| {tokenizer:<10} | {r['peak_rss_mb']:>11,.0f} | {r['rss_before_mb']:>20,.0f} | "
              f"{r['first_batch_s']:>13.1f} | {r['batches']:>7,} | {r['tokens_per_s']:>9,.0f} |")
    print("\ngoal: peak RSS under 1,000 MB for any document size")


if __name__ == "__main__":
    main()
