"""Sampling with the KV cache: cached greedy equals full recomputation; the filters keep exactly the
tokens they should; EOS stops a row; a key reproduces its samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.config import ModelConfig
from bitnet_jax.generation import (MODES, Generator, Sampling, next_token, repeated_ngram_fraction, top_k_mask,
                                   top_p_mask)
from bitnet_jax.model import BitNetLM

# Grouped-query attention (4 query heads on 2 key/value heads) so the cache path covers GQA too. A
# wide initialisation gives peaked, input-dependent logits (a 0.02 init makes near-ties everywhere).
MODEL = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                    initializer_range=0.3)
PROMPT = [3, 17, 42, 99, 5]  # 5 tokens: padded to the 16-token bucket, so padding is exercised


@pytest.fixture(scope="module")
def split():
    return nnx.split(BitNetLM(MODEL, rngs=nnx.Rngs(7)), nnx.Param)


def greedy_by_recomputing(graphdef, params, prompt, n):
    """Greedy decoding without a cache: the full forward over all tokens so far, every step. The
    sequence is padded to its final length so one compilation serves every step (causal attention:
    the padding after position i cannot change the logits at i)."""
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    tokens = np.zeros((1, len(prompt) + n), np.int32)
    tokens[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        logits = forward(params, tokens)
        tokens[0, i] = int(jnp.argmax(logits[0, i - 1]))
    return tokens[0, len(prompt):].tolist()


def test_greedy_with_kv_cache_matches_full_forward_recompute(split):
    graphdef, params = split
    gen = Generator(graphdef, max_positions=MODEL.max_position_embeddings, eos_id=None)
    out = gen(params, PROMPT, [MODES["greedy"]], 32, jax.random.PRNGKey(0))
    expected = greedy_by_recomputing(graphdef, params, PROMPT, 32)
    assert len(out.tokens[0]) == 32
    assert out.tokens[0] == expected
    assert len(set(expected)) > 3  # a non-degenerate sequence, so the comparison means something
    assert out.stopped_at_eos == [False]


def test_generation_stops_at_eos_and_a_key_reproduces_samples(split):
    graphdef, params = split
    greedy = greedy_by_recomputing(graphdef, params, PROMPT, 8)
    eos = greedy[3]
    first = greedy.index(eos)
    gen = Generator(graphdef, max_positions=MODEL.max_position_embeddings, eos_id=eos)
    modes = [MODES["greedy"], MODES["typical"], MODES["stress"]]
    a = gen(params, PROMPT, modes, 8, jax.random.PRNGKey(1))
    b = gen(params, PROMPT, modes, 8, jax.random.PRNGKey(1))
    c = gen(params, PROMPT, modes, 8, jax.random.PRNGKey(2))
    assert a.tokens[0] == greedy[:first]  # the continuation stops before EOS
    assert a.stopped_at_eos[0]
    assert a.tokens == b.tokens and a.mean_entropy == b.mean_entropy
    assert a.tokens[1:] != c.tokens[1:]  # sampled rows depend on the key
    assert all(t != eos for row in a.tokens for t in row)
    assert all(0.0 < e < np.log(MODEL.vocab_size) + 1e-4 for e in a.mean_entropy if e)


def test_prompt_that_does_not_fit_is_refused_before_compute(split):
    gen = Generator(split[0], max_positions=64, eos_id=None)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        gen.padded_length(40, 32)
    with pytest.raises(ValueError, match="empty"):
        gen.padded_length(0, 8)
    assert gen.padded_length(5, 32) == 16
    assert gen.padded_length(20, 40) == 24  # the bucket (32) is capped by what fits


def test_top_k_mask_keeps_exactly_the_k_highest():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = top_k_mask(logits, jnp.asarray([2, 4]))
    np.testing.assert_array_equal(mask, [[False, True, False, True, False], [True, True, True, True, False]])
    np.testing.assert_array_equal(top_k_mask(logits, jnp.asarray([0, 1]))[0], [True] * 5)  # 0: off
    np.testing.assert_array_equal(top_k_mask(logits, jnp.asarray([0, 1]))[1], [True, False, False, False, False])


def test_top_p_mask_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05 (shuffled): p=0.7 needs the top two, p=0.9 the top three.
    probs = np.asarray([0.15, 0.5, 0.05, 0.3])
    logits = jnp.log(jnp.asarray([probs, probs, probs, probs]))
    mask = top_p_mask(logits, jnp.asarray([0.7, 0.9, 0.3, 1.0]))
    np.testing.assert_array_equal(mask, [
        [False, True, False, True],
        [True, True, False, True],
        [False, True, False, False],  # the most likely token alone already exceeds p
        [True, True, True, True],  # 1.0: off
    ])


def test_stress_mode_draws_only_from_the_top_k():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]])
    s = Sampling(temperature=1.5, top_k=3)
    draw = lambda k: next_token(logits, k, jnp.asarray([s.temperature]), jnp.asarray([s.top_k]), jnp.asarray([s.top_p]))
    draws = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.PRNGKey(0), 300))
    assert set(np.asarray(draws).ravel().tolist()) == {9, 10, 11}
    greedy = next_token(logits, jax.random.PRNGKey(0), jnp.asarray([0.0]), jnp.asarray([0]), jnp.asarray([1.0]))
    assert int(greedy[0]) == 11


def test_modes_are_the_documented_settings():
    assert MODES["greedy"].temperature == 0.0
    assert (MODES["typical"].temperature, MODES["typical"].top_p, MODES["typical"].top_k) == (0.9, 0.95, 0)
    assert (MODES["stress"].temperature, MODES["stress"].top_k, MODES["stress"].top_p) == (1.5, 10, 1.0)


def test_repeated_ngram_fraction():
    assert repeated_ngram_fraction([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_fraction([7] * 10) == pytest.approx(1 - 1 / 7)  # 7 four-grams, one distinct
    assert repeated_ngram_fraction([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    assert repeated_ngram_fraction([1, 2]) == 0.0


def test_cli_on_a_run_without_a_checkpoint_yet_says_when_it_will_have_one(tmp_path, capsys):
    """What train.py leaves before its first save: config.yaml, the tokenizer, an empty checkpoints/."""
    from bitnet_jax import config as config_lib
    from bitnet_jax.generate import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = config_lib.from_dict({"train": {"steps": 30}, "optim": {"warmup_steps": 2}, "checkpoint": {"every": 10}})
    (run / "config.yaml").write_text(config_lib.dump(cfg))
    assert main([str(run), "--prompt", "In Python,"]) == 2
    err = capsys.readouterr().err
    assert f"{run} has no checkpoint yet" in err
    assert "every 10 steps (10, 20, ...), at the stage switch (14 and 15) and at the end (30)" in err
    assert "give a run directory made by train.py" not in err
