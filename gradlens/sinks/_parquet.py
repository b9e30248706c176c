"""Writing the parquet table: a part per flush, and the merge of parts into ranges.

Encoding (measured on the 7B-shaped ``standard`` step of ``benchmarks/bench_scale.py``):
``layer``, ``role``, ``stat`` dictionary-encoded (a few hundred names, an index per row);
``step`` dictionary/RLE (one value per flush); ``value`` float64 with ``BYTE_STREAM_SPLIT``
then zstd (the exponent bytes of gradient statistics compress, the mantissa bytes do not).
Each file's key-value metadata ``gradlens`` holds its distinct steps and statistics, so a
reader lists a run's steps from the footers alone. The writer hands parquet the names as
dictionary columns over their small tables (the collector's codes, :class:`StatRows`) and
stores no Arrow schema, so the columns read back as the plain parquet types (int64, UTF-8
strings, double).

Merging (``MERGE_EVERY`` parts into one range file) keeps the number of files small (a
100k-step run with ``log_every=1`` has ~1,600 files instead of 100k) and groups the rows by
statistic, one row group each, which is what a reader of one statistic skips by. Each range
file gets its summary beside it (:mod:`gradlens.table_summary`, for the heatmaps'
downsampling); a summary that cannot be written is skipped with a warning (readers then read
the range's rows).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gradlens.atomic_files import fsync_dir, write_atomic
from gradlens.schema import GLOBAL
from gradlens.sink_api import StatRows
from gradlens.table_parts import Part, part_name
from gradlens.table_summary import write_summary

__all__ = ["MERGE_EVERY", "META_KEY", "columns_table", "merge_parts", "rows_table", "write_part",
           "write_range"]

MERGE_EVERY = 64
META_KEY = b"gradlens"
_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    use_dictionary=["step", "layer", "role", "stat"],
    column_encoding={"value": "BYTE_STREAM_SPLIT"},
    write_statistics=["step", "stat"],
)


def rows_table(rows: Sequence[tuple[int, str, str, str, float]]) -> Any:
    """The rows ``(step, layer, role, stat, value)`` as a pyarrow table of the store's schema."""
    return columns_table(StatRows.of(rows))


def columns_table(rows: StatRows) -> Any:
    """The rows as a pyarrow table with the ``gradlens`` metadata (:func:`_meta`): ``layer``,
    ``role`` and ``stat`` as dictionary columns over their small tables of names (the
    parquet writer then encodes the codes without hashing a string per row; files are
    written without the Arrow schema, so they read back as plain strings)."""
    import pyarrow as pa

    def names(table: Sequence[str], codes: np.ndarray) -> Any:
        return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)),
                                              pa.array(table, pa.string()))

    table = pa.table({
        "step": pa.array(rows.steps, pa.int64()),
        "layer": names([lab[0] for lab in rows.labels], rows.label_ids),
        "role": names([lab[1] for lab in rows.labels], rows.label_ids),
        "stat": names(rows.stats, rows.stat_ids),
        "value": pa.array(rows.values, pa.float64()),
    })
    return table.replace_schema_metadata({META_KEY: json.dumps(_meta(rows)).encode()})


def _plain(table: Any) -> Any:
    """``table`` with its dictionary columns decoded to strings."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table[field.name].cast(pa.string()))
    return table


def _write_table(fh: BinaryIO, table: Any, cuts: Sequence[int] | None = None) -> None:
    """Write ``table`` to ``fh``, one row group per ``cuts`` interval (one in all without),
    its metadata as the file's key-value metadata, without the Arrow schema (the columns are
    the store's parquet types: int64, UTF-8 strings, double)."""
    import pyarrow.parquet as pq

    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    table = table.replace_schema_metadata(None)
    cuts = [0, len(table)] if cuts is None else cuts
    with pq.ParquetWriter(fh, table.schema, store_schema=False, **_OPTIONS) as w:
        for a, b in itertools.pairwise(cuts):
            w.write_table(table.slice(a, b - a), row_group_size=max(b - a, 1))
        w.add_key_value_metadata(meta)


def _meta(rows: StatRows) -> dict[str, list]:
    """The ``gradlens`` metadata of a file: its distinct ``steps``, the ``stats`` of its
    per-layer rows and the ``global`` stats of its run-level rows."""
    is_global = np.array([lab[0] == GLOBAL for lab in rows.labels] + [False])[rows.label_ids]
    names, n = rows.stats, len(rows.stats)
    steps = rows.steps
    runs = steps[np.flatnonzero(np.diff(steps, prepend=steps[:1] - 1))]  # one per run of a step
    per_layer = np.bincount(rows.stat_ids[~is_global], minlength=n)
    run_level = np.bincount(rows.stat_ids[is_global], minlength=n)
    return {"steps": np.unique(runs).tolist(),
            "stats": sorted(names[k] for k in np.flatnonzero(per_layer).tolist()),
            "global": sorted(names[k] for k in np.flatnonzero(run_level).tolist())}


def summary_codes(rows: StatRows) -> tuple:
    """The rows' columns as :func:`gradlens.table_summary.write_summary` takes them: steps,
    layer names and each row's, roles and each row's, statistics and each row's, values."""
    names: dict[str, int] = {}
    roles: dict[str, int] = {}
    lmap = np.array([names.setdefault(a, len(names)) for a, _ in rows.labels] + [0], np.intp)
    rmap = np.array([roles.setdefault(b, len(roles)) for _, b in rows.labels] + [0], np.intp)
    return (rows.steps, list(names), lmap[rows.label_ids], list(roles), rmap[rows.label_ids],
            list(rows.stats), rows.stat_ids, rows.values)


def _with_meta(table: Any) -> Any:
    """``table`` (read back from files) with the ``gradlens`` metadata (:func:`_meta`)."""
    import pyarrow.compute as pc

    is_global = pc.equal(table["layer"], GLOBAL)
    info = {"steps": sorted(pc.unique(table["step"]).to_pylist()),
            "stats": sorted(pc.unique(table.filter(pc.invert(is_global))["stat"]).to_pylist()),
            "global": sorted(pc.unique(table.filter(is_global)["stat"]).to_pylist())}
    return table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})


def _open_new(path: Path) -> BinaryIO:
    return open(path, "wb")


def write_part(logdir: Path, index: int, table: Any, *, fsync: bool,
               opener: Callable[[Path], BinaryIO]) -> Path:
    """Write one flush's rows as ``stats-<index>.parquet``; the path."""
    final = logdir / part_name(index)
    if table.schema.metadata is None or META_KEY not in table.schema.metadata:
        table = _with_meta(table)
    write_atomic(final, lambda fh: _write_table(fh, table), opener=opener, fsync=fsync)
    return final


def merge_parts(logdir: Path, parts: Sequence[Part], *, fsync: bool,
                columns: Sequence[StatRows] | None = None) -> Path:
    """Merge ``parts`` (consecutive, in order) into one range file, then delete them.
    ``columns``: the parts' rows, when the caller still holds them (nothing is read back)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if columns is not None:
        table: Any = StatRows.concat(columns)
    else:
        table = pa.concat_tables([pq.read_table(p[2]).replace_schema_metadata(None)
                                  for p in parts])
    final = write_range(logdir, parts[0][0], parts[-1][1], table, fsync=fsync)
    for p in parts:
        with contextlib.suppress(OSError):
            p[2].unlink()
    if fsync:
        fsync_dir(logdir)
    return final


def _small(codes: np.ndarray, n: int) -> np.ndarray:
    """``codes`` (< n) in the smallest integer type: numpy's stable sort of 16-bit integers is a
    radix sort."""
    return codes.astype(np.int16) if n < 2**15 else codes


def by_stat(rows: StatRows) -> tuple[StatRows, list[int]]:
    """``rows`` grouped by statistic name (a stable sort: write order kept within a
    statistic), and where each statistic's rows start (and the end)."""
    rank = np.zeros(len(rows.stats), np.intp)
    rank[np.argsort(np.array(rows.stats, dtype=object))] = np.arange(len(rows.stats))
    key = _small(rank[rows.stat_ids], len(rows.stats))
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=len(rows.stats))
    cuts = np.concatenate([[0], np.cumsum(counts[counts > 0])]).tolist()
    return StatRows(rows.steps[order], rows.labels, rows.label_ids[order], rows.stats,
                    rows.stat_ids[order], rows.values[order]), cuts


def write_range(logdir: Path, first: int, last: int, table: Any, *, fsync: bool) -> Path:
    """Write the rows of flushes ``first..last`` (a pyarrow table, or :class:`StatRows`) as
    one range file, grouped by statistic (a stable sort: write order kept within a
    statistic), one row group per statistic."""
    import pyarrow.compute as pc

    codes = None
    if isinstance(table, StatRows):
        rows, cuts = by_stat(table)
        table, codes = columns_table(rows), summary_codes(rows)
    else:
        table = _plain(table)
        table = _with_meta(table.take(pc.sort_indices(table, [("stat", "ascending")])))
        stats = table["stat"].combine_chunks()
        n = len(stats)
        change = pc.not_equal(stats.slice(1), stats.slice(0, max(n - 1, 0)))
        cuts = [0, *(np.flatnonzero(change.to_numpy(zero_copy_only=False)) + 1).tolist(), n]

    def write(fh: BinaryIO) -> None:
        _write_table(fh, table, cuts)

    final = logdir / part_name(first, last)
    write_atomic(final, write, opener=_open_new, fsync=fsync)
    try:
        write_summary(final, table, fsync=fsync, codes=codes)
    except Exception as err:  # an optimisation only: readers fall back to the rows
        warnings.warn(f"{final}: its summary was not written ({type(err).__name__}: {err}); "
                      "the plugin reads this range's rows instead", RuntimeWarning,
                      stacklevel=2)
    return final
