"""How a sample is shown in TensorBoard: its tag and its Markdown, and how status.py reads them back.

TensorBoard renders text summaries as Markdown, where newlines collapse, a leading ``*`` becomes a
bullet and ``<...>`` is taken for HTML. A sample is therefore written as two fenced code blocks, the
prompt and then the continuation, each shown verbatim. The fence is one backtick longer than the
longest run of backticks in the text, so no text can close it early::

    **prompt 0, greedy**, step 1000

    ```
    The meaning of
    ```

    ```
     life is ...
    ```

The tag names the prompt: ``samples/<prompt index>_<prompt's words>/<mode>``, e.g.
``samples/0_The_meaning_of/greedy`` (words joined by ``_``, cut to 40 characters). Standard library
only: status.py parses these without jax.
"""

from __future__ import annotations

import re

SLUG_CHARS = 40
_TAG = re.compile(r"^samples/(\d+)(?:_[^/]*)?/([^/]+)$")  # also the older samples/<i>/<mode>
_BACKTICKS = re.compile(r"`+")


def sample_tag(index: int, prompt: str, mode: str) -> str:
    """``samples/0_The_meaning_of/greedy``: the index keeps the cards in order, the words say which
    prompt it is."""
    slug = re.sub(r"\W+", "_", prompt).strip("_")[:SLUG_CHARS].rstrip("_")
    return f"samples/{index}_{slug}/{mode}" if slug else f"samples/{index}/{mode}"


def parse_sample_tag(tag: str) -> tuple[int, str] | None:
    """``(prompt index, mode)`` of a sample tag, new or old form; None for any other tag."""
    m = _TAG.match(tag)
    return (int(m.group(1)), m.group(2)) if m else None


def _fenced(text: str) -> str:
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def sample_markdown(index: int, prompt: str, mode: str, text: str, step: int) -> str:
    """The Markdown body of one sample (see the module docstring)."""
    return f"**prompt {index}, {mode}**, step {step}\n\n{_fenced(prompt)}\n\n{_fenced(text)}\n"


def parse_sample_markdown(body: str) -> tuple[str, str] | None:
    """``(prompt, text)`` from ``sample_markdown``'s output, exactly; None when ``body`` is not in
    that form (an older run logged the bare text)."""
    lines = body.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if re.fullmatch(r"`{3,}", lines[i]):
            try:
                end = lines.index(lines[i], i + 1)
            except ValueError:
                return None
            blocks.append("\n".join(lines[i + 1:end]))
            i = end
        i += 1
    if not lines[0].startswith("**prompt ") or len(blocks) != 2:
        return None
    return blocks[0], blocks[1]
