"""The local byte-level BPE tokenizer: round trip, special token, cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gradlens.data import tokenizer as tokmod
from gradlens.data.corpus import Corpus, Document, load_corpus
from gradlens.data.tokenizer import (
    EOS,
    default_cache_dir,
    tokenizer_path,
    train_tokenizer,
)

SAMPLES = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "  leading spaces, trailing spaces  \n\n\ttabs\r\nand CRLF\r\n",
    "Unicode: café naïve — Straße, 日本語, emoji 🎭, Ωμέγα",
    "",
    "x",
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus("stdlib", max_chars=300_000)


def test_cache_dir_resolution(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_cache_dir() == cache
    assert default_cache_dir("/x/y") == Path("/x/y")
    monkeypatch.delenv("GRADLENS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "gradlens"


def test_round_trip_and_special_token(cache: Path, corpus: Corpus) -> None:
    tok = train_tokenizer(corpus, vocab_size=512)
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(EOS) == 0
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert all(0 <= i < 512 for i in ids)
    # BPE merges compress: fewer tokens than UTF-8 bytes on in-domain text
    doc = corpus.documents[0].text
    n = len(tok.encode(doc).ids)
    assert n < 0.6 * len(doc.encode("utf-8"))
    # the file on disk is the cache entry
    assert tokenizer_path(corpus, 512).is_file()
    assert tokenizer_path(corpus, 512).parent == cache / "tokenizers"


def test_cache_hit_is_fast_and_identical(cache: Path, corpus: Corpus,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = time.perf_counter()
    first = train_tokenizer(corpus, vocab_size=400)
    t_train = time.perf_counter() - t0

    def no_training(*args: object, **kw: object) -> None:
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(tokmod, "_build", no_training)
    t0 = time.perf_counter()
    second = train_tokenizer(corpus, vocab_size=400)
    t_load = time.perf_counter() - t0
    assert t_load < t_train
    for text in [*SAMPLES, corpus.documents[1].text[:5000]]:
        assert first.encode(text).ids == second.encode(text).ids
    # another vocabulary size or another corpus is another cache entry
    with pytest.raises(AssertionError, match="cached tokenizer"):
        train_tokenizer(corpus, vocab_size=401)
    other = Corpus("o", (Document("a", "other text"),))
    assert tokenizer_path(other, 400) != tokenizer_path(corpus, 400)


def test_damaged_cache_and_force(cache: Path) -> None:
    small = Corpus("s", (Document("a", "abc abd abe " * 200), Document("b", "xyz " * 100)))
    path = tokenizer_path(small, 300)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    tok = train_tokenizer(small, vocab_size=300)  # retrains over the damaged file
    assert tok.decode(tok.encode("abc xyz").ids) == "abc xyz"
    # a tiny corpus cannot reach the asked size: fewer merges, still valid
    assert 257 <= tok.get_vocab_size() < 300
    again = train_tokenizer(small, vocab_size=300, force=True)
    assert again.encode("abe abd").ids == tok.encode("abe abd").ids


@pytest.mark.parametrize("bad", [256, 0, 4096.0, True])
def test_vocab_size_validation(cache: Path, bad: object) -> None:
    small = Corpus("s", (Document("a", "abc"),))
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(small, vocab_size=bad)  # type: ignore[arg-type]
