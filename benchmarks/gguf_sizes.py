"""GGUF file sizes of a config, from an initialised model (no checkpoint needed): every
``--weights`` type with each ``--embeddings`` type, next to the parameter count.

    python benchmarks/gguf_sizes.py [--config configs/bitnet_95m.yaml] [--tokenizer ../shared/data/llama2_tokenizer]

The sizes depend on the shapes and the vocabulary only, not on the trained values.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from flax import nnx

from bitnet_jax import config as config_lib
from bitnet_jax.data import load_tokenizer
from bitnet_jax.gguf_export import EMBEDDING_TYPES, WEIGHT_TYPES, write_gguf
from bitnet_jax.model import BitNetLM, count_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bitnet_95m.yaml")
    p.add_argument("--tokenizer", default="../shared/data/llama2_tokenizer",
                   help="tokenizer.name_or_path to export with (default: the shared LLaMA-2 tokenizer)")
    args = p.parse_args()
    cfg = config_lib.load(args.config, [f"tokenizer.name_or_path={args.tokenizer}"])
    _, params = nnx.split(BitNetLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    n = count_params(cfg.model)
    print(f"{cfg.name}: {n:,} parameters, tokenizer {args.tokenizer}")
    print(f"{'weights':<8} {'embedding':<10} {'bytes':>14} {'MiB':>9} {'bits/param':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = load_tokenizer(cfg.tokenizer).save(Path(tmp) / "tokenizer")
        for weights in WEIGHT_TYPES:
            for embeddings in EMBEDDING_TYPES:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the relu2 caveat: sizes only here
                    size = write_gguf(cfg, params, tok_dir, Path(tmp) / "m.gguf", weights=weights,
                                      embeddings=embeddings)
                print(f"{weights:<8} {embeddings:<10} {size:>14,} {size / 2**20:>9.2f} {8 * size / n:>11.2f}")


if __name__ == "__main__":
    main()
