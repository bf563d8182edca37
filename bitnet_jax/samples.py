"""The periodic sampling hook: every ``log.samples_every`` steps, each prompt of ``log.prompts`` is
continued in the three modes (greedy, typical, stress; one batch of 3 rows per prompt).

Each continuation goes to TensorBoard as text ``samples/<prompt index>_<prompt's words>/<mode>``
(the prompt and the generated text as two verbatim blocks: ``sample_text``) and to ``samples.jsonl``
(the generated text only) as one line
``{"step", "prompt_index", "prompt", "mode", "text", "num_tokens", "entropy", "repetition"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from bitnet_jax.config import Config, ConfigError
from bitnet_jax.generation import MODES, Generator, padded_length, repeated_ngram_fraction
from bitnet_jax.sample_text import sample_markdown, sample_tag

SAMPLES_KEY_OFFSET = 2  # sampling keys derive from train.seed + 2 (the model uses seed, the state seed + 1)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model saw documents start in training: BOS (if any) then the text's ids."""
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return head + tokenizer.encode(prompt)


def checked_prompts(cfg: Config, tokenizer) -> list[tuple[str, list[int]]]:
    """``log.prompts`` with their ids; a ConfigError names the first prompt that does not fit the model."""
    prompts = [(p, prompt_ids(tokenizer, p)) for p in cfg.log.prompts]
    for i, (text, ids) in enumerate(prompts):
        try:
            padded_length(len(ids), cfg.log.max_new_tokens, cfg.model.max_position_embeddings)
        except ValueError as e:
            raise ConfigError(f"log.prompts[{i}] ({text[:40]!r}): {e}") from None
    return prompts


class Sampler:
    """``sampler(step, params)`` writes the samples of ``step`` and returns their records (with their
    token ids, for the anomaly detector)."""

    def __init__(self, cfg: Config, tokenizer, graphdef: nnx.GraphDef, run_dir: Path, tb, *,
                 write: bool = True):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tb = tb
        self.write = write
        self.jsonl = Path(run_dir) / "samples.jsonl"
        self.generator = Generator(graphdef, max_positions=cfg.model.max_position_embeddings,
                                   eos_id=tokenizer.eos_id)
        self.prompts = checked_prompts(cfg, tokenizer)
        self.base_key = jax.random.PRNGKey(cfg.train.seed + SAMPLES_KEY_OFFSET)

    def __call__(self, step: int, params) -> list[dict[str, Any]]:
        modes = list(MODES)
        key = jax.random.fold_in(self.base_key, step)
        records = []
        for index, (prompt, ids) in enumerate(self.prompts):
            out = self.generator(params, ids, [MODES[m] for m in modes], self.cfg.log.max_new_tokens,
                                 jax.random.fold_in(key, index))
            for row, mode in enumerate(modes):
                tokens = out.tokens[row]
                records.append({
                    "step": step, "prompt_index": index, "prompt": prompt, "mode": mode,
                    "text": self.tokenizer.decode(tokens), "num_tokens": len(tokens),
                    "entropy": round(out.mean_entropy[row], 4),
                    "repetition": round(repeated_ngram_fraction(tokens), 4),
                    "tokens": tokens,
                })
        if self.write:
            self._write(step, records)
        return records

    def _write(self, step: int, records: list[dict[str, Any]]) -> None:
        for r in records:
            index, prompt, mode = r["prompt_index"], r["prompt"], r["mode"]
            self.tb.text(step, sample_tag(index, prompt, mode), sample_markdown(index, prompt, mode, r["text"], step))
        with open(self.jsonl, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({k: v for k, v in r.items() if k != "tokens"}, ensure_ascii=False) + "\n")
