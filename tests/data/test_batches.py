"""Token caching, the per-document held-out split, train and eval windows."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens.data.batches import (
    TrainBatches,
    eval_windows,
    prepare_data,
    split_tokens,
    tokenize_corpus,
)
from gradlens.data.corpus import Corpus, Document, load_corpus
from gradlens.data.tokenizer import train_tokenizer


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_split_holds_out_the_tail_of_every_document() -> None:
    ids = np.arange(1, 141, dtype=np.uint16)  # documents of 100, 1, 39 tokens
    offsets = np.array([0, 100, 101, 140])
    s = split_tokens(ids, offsets, eval_fraction=0.05, eos_id=0)
    # ceil(5) = 5 of the first, none of the 1-token one, ceil(1.95) = 2 of the last
    assert s.eval.tolist() == [96, 97, 98, 99, 100, 0, 139, 140]
    assert s.train.tolist() == [*range(1, 96), 0, 101, 0, *range(102, 139)]
    assert s.train.dtype == torch.int64 and s.n_tokens == 8 + 95 + 1 + 1 + 1 + 37
    real = set(range(1, 141))
    assert not (set(s.train.tolist()) & set(s.eval.tolist())) - {0}
    assert (set(s.train.tolist()) | set(s.eval.tolist())) - {0} == real
    with pytest.raises(ValueError, match="eval_fraction"):
        split_tokens(ids, offsets, eval_fraction=0.0)


def test_train_batches_shapes_seed_and_bounds() -> None:
    stream = torch.arange(1000)
    a = TrainBatches(stream, batch_size=4, seq_len=16, seed=3)
    got = [b for _, b in zip(range(5), a, strict=False)]
    assert all(b.shape == (4, 17) and b.dtype == torch.int64 for b in got)
    # windows are contiguous slices of the stream
    for b in got:
        assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, 16, dtype=torch.long))
        assert int(b.min()) >= 0 and int(b.max()) <= 999
    again = [b for _, b in zip(range(5), TrainBatches(stream, 4, 16, seed=3), strict=False)]
    assert all(torch.equal(x, y) for x, y in zip(got, again, strict=True))
    other = next(iter(TrainBatches(stream, 4, 16, seed=4)))
    assert not torch.equal(other, got[0])
    assert a.tokens_per_batch == 64
    # next() continues one stream; iter() restarts it
    assert torch.equal(next(a), got[0]) and torch.equal(next(a), got[1])
    # every start is reachable, including the last one (999 - 16)
    starts = torch.cat([b[:, 0] for _, b in zip(range(400), TrainBatches(stream, 8, 16),
                                                   strict=False)])
    assert int(starts.max()) == 1000 - 17 and int(starts.min()) == 0


def test_eval_windows_fixed_and_disjoint() -> None:
    stream = torch.arange(10_000)
    batches = eval_windows(stream, n_batches=3, batch_size=4, seq_len=63)
    assert len(batches) == 3 and all(b.shape == (4, 64) for b in batches)
    starts = torch.cat([b[:, 0] for b in batches]).tolist()
    assert starts == sorted(starts) and starts[0] == 0
    assert all(b - a >= 64 for a, b in itertools.pairwise(starts))
    assert int(batches[-1].max()) <= 9999
    assert all(torch.equal(x, y) for x, y in zip(
        batches, eval_windows(stream, 3, 4, 63), strict=True))
    # a short stream gives fewer (still disjoint) batches
    short = eval_windows(torch.arange(300), n_batches=5, batch_size=2, seq_len=63)
    assert len(short) == 2  # 300 // 64 = 4 disjoint windows = 2 batches
    with pytest.raises(ValueError, match="too little text"):
        eval_windows(torch.arange(10), 1, 1, seq_len=10)
    with pytest.raises(ValueError, match="too little text"):
        TrainBatches(torch.arange(10), 1, seq_len=10)


def _corpus() -> Corpus:
    words = ["the", "king", "and", "queen", "went", "to", "castle", "by", "sea"]
    rng = np.random.default_rng(0)
    docs = [Document(f"d{i}", " ".join(rng.choice(words, size=1500)) + "\n") for i in range(4)]
    return Corpus("words", tuple(docs))


def test_tokenize_cache_and_no_overlap(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = _corpus()
    tok = train_tokenizer(corpus, vocab_size=300)
    ids, offsets = tokenize_corpus(corpus, tok)
    assert ids.dtype == np.uint16 and len(offsets) == 5 and offsets[-1] == len(ids)
    for d, a, b in zip(corpus.documents, offsets[:-1], offsets[1:], strict=True):
        assert tok.decode(ids[a:b].tolist()) == d.text
    assert len(list((cache / "tokens").glob("*.npy"))) == 2

    def no_encode(*args: object, **kw: object) -> None:
        raise AssertionError("cached ids should have been used")

    monkeypatch.setattr(type(tok), "encode_batch_fast", no_encode, raising=False)
    monkeypatch.setattr(type(tok), "encode_batch", no_encode)
    ids2, offsets2 = tokenize_corpus(corpus, tok)
    assert np.array_equal(ids, ids2) and np.array_equal(offsets, offsets2)

    monkeypatch.undo()
    monkeypatch.setenv("GRADLENS_CACHE", str(cache))
    data = prepare_data(corpus, vocab_size=300)
    assert data.vocab_size <= 300 and data.splits.n_tokens == len(ids) + 2 * 3
    # no held-out window appears among 1600 train windows
    ev = data.eval_batches(4, 2, 32)
    train_rows = {tuple(r) for _, b in zip(range(200), data.train_batches(8, 32), strict=False)
                  for r in b.tolist()}
    assert not {tuple(r) for b in ev for r in b.tolist()} & train_rows
    summary = data.summary()
    assert summary["train_tokens"] + summary["eval_tokens"] == data.splits.n_tokens


def test_default_corpus_pipeline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pipeline on a slice of the default corpus (stdlib keeps it fast)."""
    corpus = load_corpus("stdlib", max_chars=150_000)
    data = prepare_data(corpus, vocab_size=512)
    b = next(iter(data.train_batches(2, 64, seed=0)))
    assert b.shape == (2, 65) and int(b.max()) < 512
    # the longest run between separators decodes to text of one document
    pieces = [p for p in torch.tensor_split(b[0], torch.nonzero(b[0] == 0).flatten()) if len(p)]
    longest = max(pieces, key=len)
    longest = longest[1:] if int(longest[0]) == 0 else longest
    text = data.tokenizer.decode(longest.tolist())
    assert len(text) > 20 and any(text in d.text for d in corpus.documents)
    # second preparation: everything from the cache
    again = prepare_data(corpus, vocab_size=512)
    assert torch.equal(again.splits.train, data.splits.train)
