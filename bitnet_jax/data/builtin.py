"""The builtin corpus: real English text present on every machine with Python, no network needed.

The source is the help text of the standard library's ``pydoc_data.topics.topics`` (about 79 topics,
465k characters of the Python reference documentation). One topic is one document; documents come
in sorted key order so the corpus is the same on every machine with the same Python version.
"""

from __future__ import annotations

import functools
import hashlib


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """The corpus documents, one per pydoc topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return tuple(topics[key] for key in sorted(topics))


@functools.lru_cache(maxsize=1)
def builtin_corpus_sha256() -> str:
    """sha256 over the documents (length-prefixed, so document boundaries count)."""
    h = hashlib.sha256()
    for doc in builtin_documents():
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
