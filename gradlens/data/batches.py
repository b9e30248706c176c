"""Token streams, the train / held-out split and the batches the training loop consumes.

Pipeline: :func:`tokenize_corpus` encodes every document once (cached as ``.npy``), then
:func:`split_tokens` makes two streams:

- **held-out**: the last ``eval_fraction`` (default 5%) of the tokens of *every* document, so the
  evaluation text comes from every play or file (not only from the last one in reading order);
- **train**: the rest of every document.

Within each stream the pieces are concatenated in corpus order with the :data:`EOS` id between
documents. Train and held-out windows are drawn from different streams, so they never share a
token position; a window may cross a document boundary (through an ``EOS``), as in the usual
packed-sequence pretraining.

Batches are ``(batch_size, seq_len + 1)`` ``LongTensor`` windows. For an HF causal LM pass the
same tensor as ``input_ids`` and ``labels`` (the model shifts labels itself): that is
``seq_len`` predicted tokens per row, and the tokens-seen count uses ``seq_len``.

- :class:`TrainBatches`: an endless iterator; each window starts at a uniform random offset of
  the train stream, drawn from a ``torch.Generator`` seeded with ``seed`` (same seed, same
  batches, on any machine).
- :func:`eval_windows`: a fixed list of held-out batches, evenly spaced over the held-out stream,
  disjoint when the stream is long enough, no randomness.

Token caches: ``<cache_dir>/tokens/<corpus fingerprint[:16]>-<tokenizer hash[:16]>.ids.npy``
(``uint16`` when the vocabulary fits, else ``int32``) and ``...offsets.npy`` (``int64`` document
boundaries, length ``documents + 1``).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlens.data.corpus import Corpus
from gradlens.data.tokenizer import EOS, atomic_write_bytes, default_cache_dir, train_tokenizer

__all__ = [
    "DataBundle",
    "TokenSplits",
    "TrainBatches",
    "eval_windows",
    "prepare_data",
    "split_tokens",
    "tokenize_corpus",
]


def _tokenizer_hash(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def tokenize_corpus(corpus: Corpus, tokenizer: Any, cache_dir: str | Path | None = None,
                    *, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Encode every document of ``corpus``: ``(ids, offsets)``.

    ``ids`` is the concatenation of the documents' token ids (no separators), ``offsets`` the
    ``len(documents) + 1`` boundaries: document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.
    Cached under ``cache_dir`` keyed by (corpus fingerprint, tokenizer content).
    """
    root = default_cache_dir(cache_dir) / "tokens"
    key = f"{corpus.fingerprint[:16]}-{_tokenizer_hash(tokenizer)[:16]}"
    ids_path, off_path = root / f"{key}.ids.npy", root / f"{key}.offsets.npy"
    if use_cache and ids_path.is_file() and off_path.is_file():
        try:
            ids, offsets = np.load(ids_path), np.load(off_path)
            if offsets.ndim == 1 and len(offsets) == len(corpus) + 1 and offsets[-1] == len(ids):
                return ids, offsets
        except (OSError, ValueError):
            pass  # a damaged cache file: encode again
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode([d.text for d in corpus.documents], add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32
    ids = np.empty(int(offsets[-1]), dtype=dtype)
    for e, a, b in zip(encodings, offsets[:-1], offsets[1:], strict=True):
        ids[a:b] = e.ids
    if use_cache:
        _save_npy(off_path, offsets)
        _save_npy(ids_path, ids)
    return ids, offsets


@dataclass(frozen=True)
class TokenSplits:
    """The train and held-out token streams (``int64`` tensors) and how they were cut."""

    train: torch.Tensor
    eval: torch.Tensor
    eval_fraction: float
    eos_id: int

    @property
    def n_tokens(self) -> int:
        """Tokens in both streams, separators included."""
        return len(self.train) + len(self.eval)


def split_tokens(ids: np.ndarray, offsets: np.ndarray, eval_fraction: float = 0.05,
                 eos_id: int = 0) -> TokenSplits:
    """Hold out the last ``ceil(eval_fraction * n)`` tokens of every ``n``-token document.

    A document of one token goes to train whole. Separators: ``eos_id`` between documents.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    train_parts: list[np.ndarray] = []
    eval_parts: list[np.ndarray] = []
    sep = np.array([eos_id], dtype=np.int64)
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        n = b - a
        if n == 0:
            continue
        n_eval = math.ceil(eval_fraction * n) if n > 1 else 0
        cut = b - n_eval
        for parts, piece in ((train_parts, ids[a:cut]), (eval_parts, ids[cut:b])):
            if len(piece):
                if parts:
                    parts.append(sep)
                parts.append(piece.astype(np.int64))
    train = np.concatenate(train_parts) if train_parts else np.zeros(0, np.int64)
    held = np.concatenate(eval_parts) if eval_parts else np.zeros(0, np.int64)
    return TokenSplits(torch.from_numpy(train), torch.from_numpy(held), eval_fraction, eos_id)


def _check_length(stream: torch.Tensor, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(stream) < seq_len + 1:
        raise ValueError(
            f"too little text: the {what} stream has {len(stream)} tokens, and one window needs "
            f"seq_len + 1 = {seq_len + 1}; use a bigger corpus, a shorter seq_len or a larger "
            f"eval_fraction"
        )


class TrainBatches:
    """Endless seeded batches of random ``(batch_size, seq_len + 1)`` train windows.

    Iterating twice restarts from the seed. ``next`` on the object itself continues one stream.
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0,
                 device: str | torch.device | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_length(stream, seq_len, "train")
        self.stream = stream
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.device = device
        self._offsets = torch.arange(seq_len + 1)
        self._it: Iterator[torch.Tensor] | None = None

    @property
    def tokens_per_batch(self) -> int:
        """Predicted tokens per batch: ``batch_size * seq_len``."""
        return self.batch_size * self.seq_len

    def __iter__(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        high = len(self.stream) - self.seq_len  # starts in [0, high)
        while True:
            starts = torch.randint(0, high, (self.batch_size,), generator=gen)
            batch = self.stream[starts[:, None] + self._offsets]
            yield batch if self.device is None else batch.to(self.device, non_blocking=True)

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self)
        return next(self._it)


def eval_windows(stream: torch.Tensor, n_batches: int, batch_size: int, seq_len: int,
                 device: str | torch.device | None = None) -> list[torch.Tensor]:
    """``n_batches`` fixed held-out batches of ``(batch_size, seq_len + 1)`` windows.

    The ``n_batches * batch_size`` window starts are evenly spaced over the stream (stride at
    least ``seq_len + 1``, so windows are disjoint); when the stream is too short for that many
    disjoint windows, there are fewer batches (at least one, whose windows may overlap).
    """
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches}, {batch_size}")
    _check_length(stream, seq_len, "held-out")
    window = seq_len + 1
    room = len(stream) - window  # last valid start
    fit = room // window + 1  # disjoint windows that fit
    n = min(n_batches * batch_size, fit)
    n = max(batch_size, n - n % batch_size)
    if n <= fit:
        stride = room // (n - 1) if n > 1 else 0
        starts = torch.arange(n) * stride
    else:  # fewer disjoint windows than one batch: overlap them
        starts = torch.linspace(0, room, n).round().long()
    idx = starts[:, None] + torch.arange(window)
    windows = stream[idx]
    batches = list(windows.split(batch_size))
    return batches if device is None else [b.to(device) for b in batches]


@dataclass(frozen=True)
class DataBundle:
    """Corpus, tokenizer and token splits: what a run needs to make batches."""

    corpus: Corpus
    tokenizer: Any
    splits: TokenSplits
    vocab_size: int

    def train_batches(self, batch_size: int, seq_len: int, seed: int = 0,
                      device: str | torch.device | None = None) -> TrainBatches:
        """Seeded endless train batches (see :class:`TrainBatches`)."""
        return TrainBatches(self.splits.train, batch_size, seq_len, seed, device)

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int,
                     device: str | torch.device | None = None) -> list[torch.Tensor]:
        """Fixed held-out batches (see :func:`eval_windows`)."""
        return eval_windows(self.splits.eval, n_batches, batch_size, seq_len, device)

    def summary(self) -> dict[str, Any]:
        """Sizes for logs and run metadata."""
        return {
            "corpus": self.corpus.name,
            "corpus_fingerprint": self.corpus.fingerprint,
            "documents": len(self.corpus),
            "chars": self.corpus.n_chars,
            "vocab_size": self.vocab_size,
            "train_tokens": len(self.splits.train),
            "eval_tokens": len(self.splits.eval),
            "eval_fraction": self.splits.eval_fraction,
        }


def prepare_data(corpus: Corpus | str | Path | None = None, vocab_size: int = 4096,
                 cache_dir: str | Path | None = None, eval_fraction: float = 0.05) -> DataBundle:
    """Load the corpus (see :func:`~gradlens.data.corpus.load_corpus`), train or load the
    tokenizer, tokenize (cached) and split. The steps after the first run take well under a
    second; the first run on the plays takes seconds (tokenizer training and encoding)."""
    from gradlens.data.corpus import load_corpus

    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    tokenizer = train_tokenizer(corpus, vocab_size, cache_dir)
    ids, offsets = tokenize_corpus(corpus, tokenizer, cache_dir)
    eos_id = tokenizer.token_to_id(EOS)
    splits = split_tokens(ids, offsets, eval_fraction, eos_id)
    return DataBundle(corpus, tokenizer, splits, tokenizer.get_vocab_size())
