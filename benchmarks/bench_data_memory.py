"""Loader memory on one very long document: peak RSS and tokens/s over a single-line text file.

    .venv/bin/python benchmarks/bench_data_memory.py [--mb 34] [--tokenizers builtin,llama2]
        [--text fineweb|shakespeare] [--num-workers 0,2] [--tokenize-batch 256] [--batch 32]
        [--seq-len 1024] [--passes 1]

Builds a text file of ``--mb`` MB holding one line (the shared FineWeb-Edu sample, whitespace
squeezed, or Tiny Shakespeare with its newlines turned into spaces, repeated until the size is
reached) in a temporary folder, then, for each tokenizer and ``data.num_workers``, runs
``build_train_loader`` in a fresh process over it (``data.source: local``, the default
``text_unit: paragraph``, so the whole file is one document; evaluation off, since the only
document would otherwise be held out). The process reads ``--passes`` passes over the document
(until the loader state's epoch moves on), then reports its own peak resident memory
(``getrusage``), the resident memory before the loader was built (imports, tokenizer), the time
to the first batch and the tokens/s after it. The parent also records the child's peak as the
kernel reports it to ``wait4`` (the largest of the child and its reaped worker processes) and,
sampling ``/proc`` every 20 ms, the peak of the sum over the child and its workers. One tokenizer thread (``TOKENIZERS_PARALLELISM=false``),
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


def write_one_line(path: Path, megabytes: float, source: str = "fineweb") -> int:
    """One line of real English text of about ``megabytes`` MB; returns its size in bytes."""
    from bitnet_jax.data.make_fineweb_fixture import read_texts

    if source == "shakespeare":  # newlines -> spaces: blank lines leave runs of two spaces
        texts = [(shared_data() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").replace("\n", " ")]
    else:
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


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (0 once they are gone)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0) / 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measured_child(argv: list[str], env: dict) -> tuple[int, str, str, float, float]:
    """Runs ``argv``; returns (exit code, stdout, stderr, its peak RSS from wait4 in MB, the sampled
    peak of the summed RSS of it and its descendants in MB)."""
    import threading

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, "".join(out), "".join(err), usage.ru_maxrss / 1024, peak[0]


def run_case(path: str, tokenizer: str, batch: int, seq_len: int, tokenize_batch: int, passes: int,
             num_workers: int = 0) -> dict:
    """One measurement, in this process."""
    import resource

    from bitnet_jax.config import Config, DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
    from bitnet_jax.data import build_train_loader, load_tokenizer

    name = str(shared_data() / "llama2_tokenizer") if tokenizer == "llama2" else tokenizer
    tok = load_tokenizer(TokenizerConfig(name_or_path=name))
    cfg = Config(model=ModelConfig(vocab_size=max(32000, tok.vocab_size), max_position_embeddings=seq_len),
                 train=TrainConfig(batch_size=batch, seq_len=seq_len), eval=EvalConfig(every=0, batches=0),
                 data=DataConfig(source="local", data_files=[path], tokenize_batch=tokenize_batch,
                                 num_workers=num_workers))
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
    parser.add_argument("--text", choices=("fineweb", "shakespeare"), default="fineweb", help="text to repeat")
    parser.add_argument("--num-workers", default="0", help="comma-separated data.num_workers values")
    parser.add_argument("--tokenize-batch", type=int, default=256, help="data.tokenize_batch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--passes", type=int, default=1, help="passes over the document")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.case:
        spec = json.loads(args.case)
        print(json.dumps(run_case(spec["path"], spec["tokenizer"], args.batch, args.seq_len,
                                  args.tokenize_batch, args.passes, spec["num_workers"])))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one_line.txt"
        size = write_one_line(path, args.mb, args.text)
        cases = [(t, int(w)) for t in args.tokenizers.split(",") for w in args.num_workers.split(",")]
        for tokenizer, workers in cases:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
            spec = json.dumps({"path": str(path), "tokenizer": tokenizer, "num_workers": workers})
            rc, stdout, stderr, wait4_mb, tree_mb = measured_child(
                [sys.executable, __file__, "--case", spec, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                 "--tokenize-batch", str(args.tokenize_batch), "--passes", str(args.passes)], env)
            if rc:
                rows.append((tokenizer, workers, None, stderr.strip().splitlines()[-1:] or [f"exit {rc}"]))
                continue
            r = json.loads(stdout.strip().splitlines()[-1])
            rows.append((tokenizer, workers, {**r, "wait4_mb": wait4_mb, "tree_mb": tree_mb}, None))

    print(f"\nLoader memory: one document of {size / 1e6:.1f} MB on one line ({args.text}), data.tokenize_batch "
          f"{args.tokenize_batch}, batch {args.batch} x {args.seq_len}+1, {args.passes} pass(es), 1 tokenizer thread\n")
    print(f"| {'tokenizer':<10} | {'workers':>7} | {'peak RSS MB':>11} | {'wait4 max MB':>12} | {'sum w/ workers MB':>17} "
          f"| {'RSS before loader MB':>20} | {'first batch s':>13} | {'batches':>7} | {'tokens/s':>9} |")
    print(f"|{'-' * 12}|{'-' * 9}|{'-' * 13}|{'-' * 14}|{'-' * 19}|{'-' * 22}|{'-' * 15}|{'-' * 9}|{'-' * 11}|")
    for tokenizer, workers, r, error in rows:
        if r is None:
            print(f"| {tokenizer:<10} | {workers:>7} | failed: {error[0]} |")
            continue
        print(f"| {tokenizer:<10} | {workers:>7} | {r['peak_rss_mb']:>11,.0f} | {r['wait4_mb']:>12,.0f} | "
              f"{r['tree_mb']:>17,.0f} | {r['rss_before_mb']:>20,.0f} | "
              f"{r['first_batch_s']:>13.1f} | {r['batches']:>7,} | {r['tokens_per_s']:>9,.0f} |")
    print("\ngoal: peak RSS under 1,000 MB for any document size")


if __name__ == "__main__":
    main()
