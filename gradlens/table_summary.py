"""Per-step-range summaries of the parquet table, for the heatmaps' downsampling.

Beside each range file ``stats-000001-000064.parquet`` the writer puts
``stats-000001-000064.summary.npz``. The range's steps are cut into blocks of ``B`` steps
(``block = step // B``, ``B`` a power of two); for every statistic, every layer with
per-layer rows of it and every block the summary holds

- ``n``: the number of finite values, ``sum``: their sum, ``max``: their max (``-inf`` when
  ``n = 0``), a ``(step, layer, stat)`` written twice counted once, with its last-written
  value (what the readers keep);
- per block, the first and last step the statistic was logged at and how many steps.

A heatmap column of ``w`` steps (``w`` a power of two, ``column = step // w``) is a union of
whole blocks when ``B <= w``: its ``n`` and ``sum`` are sums of the blocks', its ``max`` their
max. So its max equals the max over the rows exactly, and its mean ``sum / n`` equals the
rows' mean up to the order of the additions (relative error below ``n * 2**-53`` for values
of one sign).

``B`` is the smallest power of two of at least 8 x the range's mean gap between logged steps
(8 logged steps per block on average): ``B = 8`` at ``log_every=1``, so a summary holds about
1/8 of its range's values, three numbers each.

The summary is written after its range file, atomically (:mod:`gradlens.atomic_files`); it
names its range file and that file's size, and a reader ignores a summary that is missing,
damaged or does not match (it reads that range's rows instead).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.atomic_files import write_atomic
from gradlens.schema import GLOBAL

__all__ = ["SUMMARY_SUFFIX", "Blocks", "block_aggregates", "block_size", "read_summary",
           "summary_path", "write_summary"]

SUMMARY_SUFFIX = ".summary.npz"
STEPS_PER_BLOCK = 8
_VERSION = 1


def summary_path(range_file: Path) -> Path:
    """``stats-000001-000064.summary.npz`` beside ``stats-000001-000064.parquet``."""
    return range_file.with_name(range_file.name.removesuffix(".parquet") + SUMMARY_SUFFIX)


def block_size(steps: np.ndarray) -> int:
    """The smallest power of two >= ``STEPS_PER_BLOCK`` x the mean gap between the distinct
    ``steps`` (8 when every step is logged)."""
    u = np.unique(steps)
    gap = (float(u[-1]) - float(u[0])) / (len(u) - 1) if len(u) > 1 else 1.0
    return 1 << max(0, math.ceil(math.log2(max(STEPS_PER_BLOCK * gap, 1.0))))


@dataclass
class Blocks:
    """One statistic's aggregates in one file: ``layers`` (first-appearance order) x blocks."""

    layers: list[str]
    roles: list[str]  # of each layer, from its first row
    block: int  # B, steps per block
    ids: np.ndarray  # block ids (step // B), increasing
    first: np.ndarray  # first logged step in each block
    last: np.ndarray  # last logged step in each block
    count: np.ndarray  # logged steps in each block
    n: np.ndarray  # layers x blocks: finite values
    total: np.ndarray  # layers x blocks: their sum
    peak: np.ndarray  # layers x blocks: their max, -inf where n == 0


def block_aggregates(row: np.ndarray, steps: np.ndarray, values: np.ndarray, n_rows: int,
                     width: int) -> tuple[np.ndarray, ...]:
    """``(ids, first, last, count, n, total, peak)`` of rows ``(row, step, value)`` (one value
    per (row, step)) in blocks of ``width`` steps; sums accumulate in row order."""
    ids, col = np.unique(steps // width, return_inverse=True)
    nb = len(ids)
    cell = row * nb + col
    fin = np.isfinite(values)
    n = np.bincount(cell, weights=fin, minlength=n_rows * nb).astype(np.int64)
    total = np.bincount(cell, weights=np.where(fin, values, 0.0), minlength=n_rows * nb)
    peak = np.full(n_rows * nb, -np.inf)
    np.maximum.at(peak, cell[fin], values[fin])
    first = np.full(nb, np.iinfo(np.int64).max)
    last = np.full(nb, np.iinfo(np.int64).min)
    np.minimum.at(first, col, steps)
    np.maximum.at(last, col, steps)
    _, once = np.unique(steps, return_index=True)
    count = np.bincount(col[once], minlength=nb)
    shape = (n_rows, nb)
    return ids, first, last, count, n.reshape(shape), total.reshape(shape), peak.reshape(shape)


def _codes(column: Any) -> tuple[list[str], np.ndarray]:
    """(names, code of each row) of a string or dictionary column."""
    import pyarrow as pa

    arr = column.combine_chunks()
    d = arr if pa.types.is_dictionary(arr.type) else arr.dictionary_encode()
    return d.dictionary.to_pylist(), d.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _summary_arrays(table: Any, source: Path) -> dict[str, np.ndarray]:
    """The npz members of ``table``'s summary (rows of one range file)."""
    import pyarrow.compute as pc

    t = table.filter(pc.not_equal(table["layer"], GLOBAL))
    steps_all = table["step"].to_numpy()
    width = block_size(steps_all) if len(steps_all) else STEPS_PER_BLOCK
    names, lcode = _codes(t["layer"])
    roles, rcode = _codes(t["role"])
    stats, scode = _codes(t["stat"])
    steps = t["step"].to_numpy().astype(np.int64)
    values = t["value"].to_numpy().astype(np.float64)
    out: dict[str, np.ndarray] = {}
    index = []
    for k in np.argsort(stats, kind="stable") if stats else []:
        sel = np.flatnonzero(scode == k)
        if not len(sel):
            continue
        lc, st, va, rc = lcode[sel], steps[sel], values[sel], rcode[sel]
        key = (st - st.min()) * len(names) + lc
        _, last_rev = np.unique(key[::-1], return_index=True)
        if len(last_rev) < len(key):  # a row written twice: keep the last-written
            keep = np.sort(len(key) - 1 - last_rev)
            lc, st, va, rc = lc[keep], st[keep], va[keep], rc[keep]
        uniq, first_at = np.unique(lc, return_index=True)
        order = np.argsort(first_at, kind="stable")
        layer_ids, role_ids = uniq[order], rc[first_at[order]]
        row_of = np.zeros(len(names), np.int64)
        row_of[layer_ids] = np.arange(len(layer_ids))
        ids, first, last, count, n, total, peak = block_aggregates(
            row_of[lc], st, va, len(layer_ids), width)
        i = len(index)
        index.append([stats[k], len(layer_ids), len(ids)])
        out[f"i{i}"] = np.concatenate([layer_ids, role_ids, ids, first, last, count])
        out[f"n{i}"] = n.astype(np.min_scalar_type(int(n.max(initial=0))))
        out[f"v{i}"] = np.stack([total, peak])
    meta = {"version": _VERSION, "source": source.name, "source_size": source.stat().st_size,
            "block": width, "layers": names, "roles": roles, "stats": index}
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return out


def write_summary(range_file: Path, table: Any, *, fsync: bool) -> Path:
    """Write the summary of ``range_file`` (already written, with the rows ``table``)."""
    arrays = _summary_arrays(table, range_file)
    final = summary_path(range_file)
    write_atomic(final, lambda fh: np.savez(fh, **arrays), fsync=fsync)
    return final


_BAD = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def read_summary(range_file: Path, stat: str,
                 cache: dict[Path, tuple[tuple[int, int], dict[str, Any]]] | None = None
                 ) -> Blocks | None:
    """``stat``'s :class:`Blocks` in the summary of ``range_file``, or None when the summary is
    missing, unreadable or not of this file (the caller reads the range's rows instead).
    ``cache`` keeps each summary's parsed metadata per (size, mtime)."""
    path = summary_path(range_file)
    try:
        st = path.stat()
        source_size = range_file.stat().st_size
        with np.load(path, allow_pickle=False) as z:
            hit = cache.get(path) if cache is not None else None
            if hit is not None and hit[0] == (st.st_size, st.st_mtime_ns):
                meta = hit[1]
            else:
                meta = json.loads(z["meta"].tobytes())
                meta["index"] = {s[0]: (i, s[1], s[2]) for i, s in enumerate(meta["stats"])}
                if cache is not None:
                    cache[path] = ((st.st_size, st.st_mtime_ns), meta)
            if (meta.get("version") != _VERSION or meta.get("source") != range_file.name
                    or meta.get("source_size") != source_size):
                return None
            width = int(meta["block"])
            if stat not in meta["index"]:
                e = np.zeros(0, np.int64)
                return Blocks([], [], width, e, e, e, e, np.zeros((0, 0), np.int64),
                              np.zeros((0, 0)), np.zeros((0, 0)))
            i, n_layers, nb = meta["index"][stat]
            idx, n, v = z[f"i{i}"], z[f"n{i}"], z[f"v{i}"]
    except _BAD:
        return None
    if idx.shape != (2 * n_layers + 4 * nb,) or n.shape != (n_layers, nb) \
            or v.shape != (2, n_layers, nb):
        return None
    names, roles = meta["layers"], meta["roles"]
    cut = np.cumsum([n_layers, n_layers, nb, nb, nb])
    lay, rol, ids, first, last, count = np.split(idx, cut)
    return Blocks([names[j] for j in lay], [roles[j] for j in rol], width, ids, first, last,
                  count, n.astype(np.int64), v[0], v[1])
