"""Per-step-range summaries of the parquet table, for the heatmaps' downsampling.

Beside each range file ``stats-000001-000064.parquet`` the writer puts
``stats-000001-000064.summary.bin``. The range's steps are cut into blocks of ``B`` steps
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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.atomic_files import write_atomic
from gradlens.schema import GLOBAL

__all__ = ["SUMMARY_SUFFIX", "Blocks", "block_aggregates", "block_size", "read_summary",
           "summary_path", "write_summary"]

SUMMARY_SUFFIX = ".summary.bin"
MAGIC = b"GRADLENS-SUMMARY\n"
STEPS_PER_BLOCK = 8
_VERSION = 1


def summary_path(range_file: Path) -> Path:
    """``stats-000001-000064.summary.bin`` beside ``stats-000001-000064.parquet``."""
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


def _last_written(lc: np.ndarray, st: np.ndarray, n_names: int) -> np.ndarray | None:
    """Indices of the last-written row of each (layer, step) in write order, or None when no
    pair repeats (the usual case, checked in O(rows) when the steps never decrease)."""
    if np.all(st[1:] >= st[:-1]):
        col = np.cumsum(np.concatenate([[True], st[1:] != st[:-1]])) - 1
        if np.bincount(col * n_names + lc).max() <= 1:
            return None
    key = (st - st.min()) * n_names + lc
    _, last_rev = np.unique(key[::-1], return_index=True)
    return None if len(last_rev) == len(key) else np.sort(len(key) - 1 - last_rev)


def _table_codes(table: Any) -> tuple:
    """``(steps, names, lcode, roles, rcode, stats, scode, values)`` of a pyarrow table."""
    names, lcode = _codes(table["layer"])
    roles, rcode = _codes(table["role"])
    stats, scode = _codes(table["stat"])
    return (table["step"].to_numpy().astype(np.int64), names, lcode, roles, rcode, stats,
            scode, table["value"].to_numpy().astype(np.float64))


def _summary_blobs(codes: tuple, source: Path) -> tuple[dict[str, Any], list[bytes]]:
    """The header and the per-statistic blobs of the summary of one range's rows, given as
    codes (:func:`_table_codes`)."""
    steps_all, names, lcode, roles, rcode, stats, scode, values = codes
    names, roles, stats = list(names), list(roles), list(stats)
    distinct = np.unique(steps_all[np.flatnonzero(np.diff(steps_all, prepend=-1))]
                         if len(steps_all) else steps_all)  # one entry per run of a step
    width = block_size(distinct) if len(distinct) else STEPS_PER_BLOCK
    if GLOBAL in names:  # run-level rows: not in the heatmaps
        scode = np.where(lcode == names.index(GLOBAL), len(stats), scode)
    key = scode.astype(np.int16) if len(stats) < 2**15 - 1 else scode  # a radix sort
    by_stat = np.argsort(key, kind="stable")  # write order kept within a statistic
    bounds = np.concatenate([[0], np.cumsum(np.bincount(scode, minlength=len(stats) + 1))])
    blobs: list[bytes] = []
    index: dict[str, list[Any]] = {}
    offset = 0
    for k in sorted(range(len(stats)), key=lambda i: stats[i]):
        sel = by_stat[bounds[k]:bounds[k + 1]]
        if not len(sel):
            continue
        lc, st, va, rc = lcode[sel], steps_all[sel], values[sel], rcode[sel]
        keep = _last_written(lc, st, len(names))
        if keep is not None:  # a row written twice: keep the last-written
            lc, st, va, rc = lc[keep], st[keep], va[keep], rc[keep]
        uniq, first_at = np.unique(lc, return_index=True)
        order = np.argsort(first_at, kind="stable")
        layer_ids, role_ids = uniq[order], rc[first_at[order]]
        row_of = np.zeros(len(names), np.int64)
        row_of[layer_ids] = np.arange(len(layer_ids))
        ids, first, last, count, n, total, peak = block_aggregates(
            row_of[lc], st, va, len(layer_ids), width)
        n_type = np.min_scalar_type(int(n.max(initial=0)))
        blob = b"".join([
            np.concatenate([layer_ids, role_ids, ids, first, last, count]).astype("<i8").tobytes(),
            np.stack([total, peak]).astype("<f8").tobytes(),
            n.astype(n_type.newbyteorder("<")).tobytes()])
        index[str(stats[k])] = [offset, len(blob), len(layer_ids), len(ids), n_type.str]
        blobs.append(blob)
        offset += len(blob)
    header = {"version": _VERSION, "source": source.name,
              "source_size": source.stat().st_size, "block": width, "layers": names,
              "roles": roles, "stats": index}
    return header, blobs


def write_summary(range_file: Path, table: Any, *, fsync: bool,
                  codes: tuple | None = None) -> Path:
    """Write the summary of ``range_file`` (already written, with the rows ``table``, or
    their ``codes`` when the writer has them, :func:`_table_codes`'s tuple):
    ``MAGIC``, the JSON header's length (8 bytes, little-endian), the header (layer and role
    names, block width, and per statistic its blob's offset after the header, length, layers,
    blocks and count type), then per statistic one blob: int64 layer indices, role indices,
    block ids, first steps, last steps, step counts; float64 sums then maxes (layers x
    blocks); the finite counts (layers x blocks)."""
    header, blobs = _summary_blobs(codes if codes is not None else _table_codes(table),
                                   range_file)
    head = json.dumps(header).encode()
    final = summary_path(range_file)

    def write(fh: Any) -> None:
        fh.write(MAGIC + len(head).to_bytes(8, "little") + head)
        for blob in blobs:
            fh.write(blob)

    write_atomic(final, write, fsync=fsync)
    return final


def _header(fh: Any) -> tuple[dict[str, Any], int]:
    """The header of an open summary and where its blobs start; ValueError when damaged."""
    start = fh.read(len(MAGIC) + 8)
    if len(start) != len(MAGIC) + 8 or not start.startswith(MAGIC):
        raise ValueError("not a gradlens summary")
    size = int.from_bytes(start[len(MAGIC):], "little")
    head = fh.read(size)
    if len(head) != size:
        raise ValueError("truncated header")
    header = json.loads(head)
    if not isinstance(header, dict) or header.get("version") != _VERSION:
        raise ValueError("unknown summary version")
    return header, len(MAGIC) + 8 + size


def read_summary(range_file: Path, stat: str,
                 cache: dict[Path, tuple[tuple[int, int], tuple[dict[str, Any], int]]]
                 | None = None) -> Blocks | None:
    """``stat``'s :class:`Blocks` in the summary of ``range_file``, or None when the summary is
    missing, damaged or not of this file (the caller reads the range's rows instead).
    ``cache`` keeps each summary's parsed header per (size, mtime): a second statistic reads
    its blob alone."""
    path = summary_path(range_file)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            stamp = (st.st_size, st.st_mtime_ns)
            hit = cache.get(path) if cache is not None else None
            if hit is not None and hit[0] == stamp:
                header, base = hit[1]
            else:
                header, base = _header(fh)
                if cache is not None:
                    cache[path] = (stamp, (header, base))
            if header.get("source") != range_file.name \
                    or header.get("source_size") != range_file.stat().st_size:
                return None
            width = int(header["block"])
            entry = header["stats"].get(stat)
            if entry is None:  # no per-layer row of it in this range
                e = np.zeros(0, np.int64)
                return Blocks([], [], width, e, e, e, e, np.zeros((0, 0), np.int64),
                              np.zeros((0, 0)), np.zeros((0, 0)))
            offset, size, n_layers, nb, n_type = entry
            fh.seek(base + offset)
            blob = fh.read(size)
        n_type = np.dtype(n_type)
        n_idx, n_cells = 2 * n_layers + 4 * nb, n_layers * nb
        if len(blob) != size or size != 8 * n_idx + 16 * n_cells + n_type.itemsize * n_cells:
            return None
        idx = np.frombuffer(blob, "<i8", n_idx)
        v = np.frombuffer(blob, "<f8", 2 * n_cells, 8 * n_idx).reshape(2, n_layers, nb)
        n = np.frombuffer(blob, n_type, n_cells, 8 * n_idx + 16 * n_cells)
        names, roles = header["layers"], header["roles"]
        cut = np.cumsum([n_layers, n_layers, nb, nb, nb])
        lay, rol, ids, first, last, count = np.split(idx, cut)
        return Blocks([names[j] for j in lay], [roles[j] for j in rol], width, ids, first,
                      last, count, n.reshape(n_layers, nb).astype(np.int64), v[0], v[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
