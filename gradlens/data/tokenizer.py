"""A byte-level BPE tokenizer trained locally on a :class:`~gradlens.data.corpus.Corpus`.

Byte-level (GPT-2 style): text is mapped to bytes first, so every string, in any script, encodes
and ``decode(encode(text)) == text`` exactly; there is no unknown token. The only special token
is :data:`EOS` (id 0), which separates documents in the token stream.

Trained tokenizers are cached as ``tokenizer.json`` files under
``<cache_dir>/tokenizers/<corpus fingerprint[:16]>-v<vocab_size>.json`` and reused: the cache
key is (corpus fingerprint, vocabulary size, :data:`TOKENIZER_VERSION`). The cache folder is
``$GRADLENS_CACHE`` if set, else ``~/.cache/gradlens`` (:func:`default_cache_dir`). Writes are
atomic (temporary file + rename), so concurrent runs at worst train the same tokenizer twice.

A corpus too small to reach ``vocab_size`` merges gives a smaller vocabulary
(``tokenizer.get_vocab_size()``); a model built with the larger size simply never sees the
unused ids.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradlens.data.corpus import Corpus

__all__ = [
    "EOS",
    "TOKENIZER_VERSION",
    "default_cache_dir",
    "tokenizer_path",
    "train_tokenizer",
]

EOS = "<|endoftext|>"
"""The document separator, token id 0."""

TOKENIZER_VERSION = "1"
"""Part of the cache key: bump when the training recipe below changes."""

MIN_VOCAB_SIZE = 257
"""256 byte symbols plus :data:`EOS`."""


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$GRADLENS_CACHE``, else ``~/.cache/gradlens``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GRADLENS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gradlens"


def tokenizer_path(corpus: Corpus, vocab_size: int, cache_dir: str | Path | None = None) -> Path:
    """Where the tokenizer of ``(corpus, vocab_size)`` is cached."""
    name = f"{corpus.fingerprint[:16]}-v{vocab_size}-t{TOKENIZER_VERSION}.json"
    return default_cache_dir(cache_dir) / "tokenizers" / name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build(corpus: Corpus, vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in corpus.documents), trainer=trainer,
                            length=len(corpus.documents))
    return tok


def train_tokenizer(corpus: Corpus, vocab_size: int = 4096, cache_dir: str | Path | None = None,
                    *, min_frequency: int = 2, force: bool = False):
    """A byte-level BPE ``tokenizers.Tokenizer`` for ``corpus``, from the cache when there.

    Args:
        corpus: the training text.
        vocab_size: target vocabulary size, special token included (4096 matches
            ``build_llama("small")``); at least :data:`MIN_VOCAB_SIZE`.
        cache_dir: cache root (see :func:`default_cache_dir`).
        min_frequency: a pair must occur this often to be merged.
        force: retrain and overwrite the cached file.

    Returns:
        ``tokenizers.Tokenizer``; ``encode(text).ids`` and ``decode(ids)`` round-trip exactly,
        ``token_to_id(EOS) == 0``.
    """
    from tokenizers import Tokenizer

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {EOS}), got {vocab_size!r}"
        )
    path = tokenizer_path(corpus, vocab_size, cache_dir)
    if path.is_file() and not force:
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a damaged cache file: retrain and overwrite it
            pass
    tok = _build(corpus, vocab_size, min_frequency)
    atomic_write_bytes(path, tok.to_str().encode("utf-8"))
    return tok
