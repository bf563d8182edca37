"""Samples in TensorBoard: written by the real TensorBoard writer, read back from the event file,
rendered by TensorBoard's own text plugin, and parsed back exactly by status."""

from __future__ import annotations

import html

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.text import text_plugin
from tensorboard.util import tensor_util

from bitnet_jax.metrics import TensorBoard
from bitnet_jax.sample_text import parse_sample_markdown, parse_sample_tag, sample_markdown, sample_tag

TRICKY = [
    "* not a bullet\n# not a heading\n1. not a list",
    "\n\n  leading blank lines and indentation, trailing ones\n\n",
    "<b>not bold</b> &amp; <!-- not a comment",
    "``` a fence inside ````\n```\n`````",
    "",
]


def rendered(tmp_path, tag: str, body: str) -> tuple[list[str], str]:
    """(the event file's text tags, TensorBoard's HTML of ``body``) after a round trip through a file."""
    tb = TensorBoard(tmp_path / "tb")
    tb.text(7, tag, body)
    tb.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    tags = [t for t in ea.Tags()["tensors"] if ea.SummaryMetadata(t).plugin_data.plugin_name == "text"]
    (event,) = ea.Tensors(tag)
    assert event.step == 7
    return tags, text_plugin.text_array_to_html(tensor_util.make_ndarray(event.tensor_proto), enable_markdown=True)


@pytest.mark.parametrize("text", TRICKY)
def test_each_sample_shows_verbatim_with_its_prompt(tmp_path, text):
    prompt = "The *meaning* of"
    tag = sample_tag(0, prompt, "greedy")
    tags, page = rendered(tmp_path, tag, sample_markdown(0, prompt, "greedy", text, 7))
    assert tags == ["samples/0_The_meaning_of/greedy"]  # exactly the tag written: no /text_summary
    # Two preformatted blocks, the prompt and the continuation, each character for character.
    assert page.count("<pre><code>") == 2 and "<li>" not in page and "<h1>" not in page and "<b>" not in page
    blocks = [html.unescape(b.split("</code></pre>")[0]) for b in page.split("<pre><code>")[1:]]
    assert blocks == [prompt + "\n", text + "\n"]
    assert parse_sample_markdown(sample_markdown(0, prompt, "greedy", text, 7)) == (prompt, text)


def test_tags_name_the_prompt_and_parse_in_both_forms():
    assert sample_tag(2, "In Python,", "stress") == "samples/2_In_Python/stress"
    assert sample_tag(1, "  ", "typical") == "samples/1/typical"  # nothing to name it by
    long = sample_tag(0, "word " * 30, "greedy")
    assert long.startswith("samples/0_word_word") and len(long.split("/")[1]) <= 2 + 40
    for tag, expected in (("samples/2_In_Python/stress", (2, "stress")), ("samples/0/greedy", (0, "greedy")),
                          ("samples/x/greedy", None), ("anomaly/nonfinite", None)):
        assert parse_sample_tag(tag) == expected


def test_bare_text_from_older_runs_is_not_mistaken_for_the_new_form():
    assert parse_sample_markdown("greedy 0 at 100\nline 2") is None
    assert parse_sample_markdown("```\nonly one block\n```") is None
