"""The data pipeline: sources, tokenizer, packing, the prefetching resumable loader, fingerprints.

Public API (what the train loop uses)::

    tok = load_tokenizer(cfg.tokenizer)
    loader = build_train_loader(cfg, tok, process_index=0, process_count=1, state=None)
    batch = next(loader)            # int32 [train.batch_size // process_count, train.seq_len + 1]
    loader.state_dict(); loader.close()
    build_eval_batches(cfg, tok, process_index=0, process_count=1)  # list of eval.batches arrays
    write_fingerprint(path, cfg, tok)                                 # dataset_fingerprint.json

Modules, each importing only those before it: ``errors``, ``hashing``, ``builtin`` (the pydoc
corpus), ``builtin_bpe`` (its tokenizer), ``spm`` (SentencePiece models), ``pieces`` (long
documents cut where the ids stay exact), ``tokenizer`` (the Tokenizer type and loading any
tokenizer), ``sources`` (which rows), ``documents`` (rows -> documents with resumable positions),
``heldout`` (the evaluation set), ``packing`` (the row contract), ``workers`` (tokenizer
processes), ``loader``, ``fingerprint``, ``make_fineweb_fixture`` (CLI).
"""

from bitnet_jax.data.errors import DataError
from bitnet_jax.data.fingerprint import write_fingerprint
from bitnet_jax.data.loader import TrainLoader, build_eval_batches, build_train_loader, check_vocab
from bitnet_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataError",
    "Tokenizer",
    "TrainLoader",
    "build_eval_batches",
    "build_train_loader",
    "check_vocab",
    "load_tokenizer",
    "write_fingerprint",
]
