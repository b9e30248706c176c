"""Reading the parquet table out of core: only the files, row groups and columns a query needs.

A query names statistics, layers and a step range; :func:`scan` pushes them down to pyarrow
(row groups whose ``stat`` / ``step`` statistics exclude them are not read; a merged file has
one row group per statistic) and reads only the columns asked for. :func:`table_info` answers
"which steps and statistics" from the files' footers (their ``gradlens`` metadata), without
reading a row.

A file that cannot be read (damaged, or not parquet) is skipped with a
:class:`~gradlens.report._errors.CorruptPartWarning` naming it: the run loses that flush (or
merged range), never the rest. A file with the wrong columns or types was not written by
gradlens and raises :class:`~gradlens.report._errors.CorruptRunError`. A part deleted while
being read (a live writer merging parts) makes the scan list the files again.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from gradlens.report._errors import CorruptPartWarning, CorruptRunError
from gradlens.schema import GLOBAL, STAT_COLUMNS
from gradlens.table_parts import list_parts

__all__ = ["Query", "scan", "scan_each", "table_info"]

_STR_COLUMNS = ("layer", "role", "stat")
_RETRIES = 5

# (statistics, layers, inclusive step range, set of steps); None: no condition
Query = tuple[Collection[str] | None, Collection[str] | None, tuple[int | None, int | None],
              Collection[int] | None]


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading a parquet table needs pyarrow: pip install pyarrow") from err
    return pa, pq


def _check_schema(f: Path, schema: Any) -> None:
    pa, _ = _pyarrow()
    if schema.names != list(STAT_COLUMNS):
        raise CorruptRunError(
            f"{f}: columns {schema.names} are not {list(STAT_COLUMNS)}; move it out of the run "
            "directory"
        )
    types = {name: schema.field(name).type for name in STAT_COLUMNS}
    if not (pa.types.is_integer(types["step"])
            and (pa.types.is_floating(types["value"]) or pa.types.is_integer(types["value"]))
            and all(pa.types.is_string(types[c]) or pa.types.is_large_string(types[c])
                    or pa.types.is_dictionary(types[c]) for c in _STR_COLUMNS)):
        found = ", ".join(f"{n} {ty}" for n, ty in types.items())
        raise CorruptRunError(
            f"{f}: column types ({found}) are not step int64, layer/role/stat string, value "
            "float64; it was not written by gradlens: move it out of the run directory"
        )


def _skip(f: Path, err: BaseException) -> None:
    warnings.warn(
        f"{f}: not a readable parquet file ({err}); skipped it (the rows of that flush are "
        "lost) and read the rest. Move it out of the run directory to silence this",
        CorruptPartWarning,
        stacklevel=4,
    )


def _each_file(run: Path, read: Callable[[Path, Any], Any],
               only: Collection[Path] | None = None) -> list[Any]:
    """``read(path, ParquetFile)`` of every part (of those in ``only``) in flush order;
    unreadable parts skipped with a warning, a listing redone when a part vanishes under us
    (a live merge)."""
    pa, pq = _pyarrow()
    for attempt in range(_RETRIES):
        out = []
        parts = [p for p in list_parts(run) if only is None or p[2] in only]
        try:
            for _, _, f in parts:
                try:
                    pf = pq.ParquetFile(f, read_dictionary=list(_STR_COLUMNS))
                except FileNotFoundError:
                    raise
                except (OSError, pa.ArrowException) as err:
                    _skip(f, err)
                    continue
                _check_schema(f, pf.schema_arrow)
                try:
                    out.append(read(f, pf))
                except FileNotFoundError:
                    raise
                except (OSError, pa.ArrowException) as err:
                    _skip(f, err)
            if parts and not out and only is None:
                raise CorruptRunError(
                    f"{run}: none of its {len(parts)} parquet files is readable (see the "
                    "warnings); the table is damaged throughout")
            return out
        except FileNotFoundError:
            if attempt == _RETRIES - 1:
                raise
    return []


def _mask(t: Any, query: Query) -> Any:
    import pyarrow.compute as pc

    stats, layers, (lo, hi), step_set = query
    conds = []
    if step_set is not None:
        import pyarrow as pa

        conds.append(pc.is_in(t["step"], value_set=pa.array(sorted(step_set), pa.int64())))
    if stats is not None:
        conds.append(pc.is_in(t["stat"], value_set=_strings(stats)))
    if layers is not None:
        conds.append(pc.is_in(t["layer"], value_set=_strings(layers)))
    if lo is not None:
        conds.append(pc.greater_equal(t["step"], lo))
    if hi is not None:
        conds.append(pc.less_equal(t["step"], hi))
    if not conds:
        return None
    m = conds[0]
    for c in conds[1:]:
        m = pc.and_(m, c)
    return m


def _strings(values: Collection[str]) -> Any:
    pa, _ = _pyarrow()
    return pa.array(sorted(set(values)), pa.string())


def _row_groups(pf: Any, query: Query) -> list[int]:
    """The row groups whose ``stat`` and ``step`` statistics may hold rows of the query."""
    stats, _layers, (lo, hi), _ = query
    names = pf.schema_arrow.names
    keep = []
    for i in range(pf.metadata.num_row_groups):
        rg = pf.metadata.row_group(i)
        ok = True
        st = rg.column(names.index("stat")).statistics
        if stats is not None and st is not None and st.has_min_max:
            ok = any(st.min <= s <= st.max for s in stats)
        sp = rg.column(names.index("step")).statistics
        if ok and sp is not None and sp.has_min_max:
            ok = (lo is None or sp.max >= lo) and (hi is None or sp.min <= hi)
        if ok:
            keep.append(i)
    return keep


def _last_of_each(t: Any) -> Any:
    """``t`` (step, layer, stat columns) without its repeated ``(step, layer, stat)`` rows but
    the last-written one, order kept."""
    import numpy as np

    if t.num_rows < 2:
        return t
    u = t.select(["step", "layer", "stat"]).unify_dictionaries().combine_chunks()
    step = u["step"].to_numpy()
    layer = u["layer"].chunk(0).indices.to_numpy().astype(np.int64)
    stat = u["stat"].chunk(0).indices.to_numpy().astype(np.int64)
    n_l, n_s = int(layer.max()) + 1, int(stat.max()) + 1
    key = ((step - step.min()) * n_l + layer) * n_s + stat
    _, last_rev = np.unique(key[::-1], return_index=True)
    if len(last_rev) == len(key):
        return t
    return t.take(np.sort(len(key) - 1 - last_rev))


def steps_disjoint(run: Path) -> bool:
    """True when no logged step is in two stored files (from the footers): the repeated rows
    of a resumed run can then only be inside one file."""
    seen: set[int] = set()
    total = 0
    for info in _each_file(run, lambda _f, pf: _part_info(pf)):
        seen.update(info["steps"])
        total += len(info["steps"])
        if len(seen) != total:
            return False
    return True


def scan(run: Path, query: Query, columns: Sequence[str] = STAT_COLUMNS, *,
         dedupe_each: bool = False, only: Collection[Path] | None = None) -> Any:
    """The rows of the query as one pyarrow table of ``columns`` (file order; strings as
    dictionaries), or None when the table has no part (no part in ``only``, when given: the
    files to read). ``dedupe_each``: keep only the
    last-written row of each ``(step, layer, stat)`` of each file (exact for the whole table
    when :func:`steps_disjoint`; bounded by one file's memory)."""
    pa, _ = _pyarrow()
    if dedupe_each:
        columns = list(dict.fromkeys([*columns, "step", "layer", "stat"]))
    need = list(dict.fromkeys([*columns, *(c for c, q in (("stat", query[0]),
                                                            ("layer", query[1]))
                                            if q is not None),
                               *(["step"] if query[2] != (None, None) or query[3] is not None
                                 else [])]))

    def read(_f: Path, pf: Any) -> Any:
        groups = _row_groups(pf, query)
        t = pf.read_row_groups(groups, columns=need)
        m = _mask(t, query)
        t = t if m is None else t.filter(m)
        t = t.select(list(columns))
        if dedupe_each:
            t = _last_of_each(t)
        return t.cast(_schema(t.schema, pa))

    tables = _each_file(run, read, only=None if only is None else set(only))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def scan_each(run: Path) -> Iterator[Any]:
    """The stored files' rows, one pyarrow table per file, in flush order (for streaming)."""
    for _, _, f in list_parts(run):
        t = scan_one(f)
        if t is not None:
            yield t


def scan_one(f: Path) -> Any:
    """One stored file as a pyarrow table (None, with a warning, when it is unreadable)."""
    pa, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(f)
        _check_schema(f, pf.schema_arrow)
        return pf.read().replace_schema_metadata(None)
    except (OSError, pa.ArrowException) as err:
        _skip(f, err)
        return None


def _schema(schema: Any, pa: Any) -> Any:
    """The store's types: step int64, strings as dictionary<int32, string>, value float64."""
    fields = []
    for f in schema:
        if f.name == "step":
            fields.append(pa.field("step", pa.int64()))
        elif f.name == "value":
            fields.append(pa.field("value", pa.float64()))
        else:
            fields.append(pa.field(f.name, pa.dictionary(pa.int32(), pa.string())))
    return pa.schema(fields)


def _part_info(pf: Any) -> dict[str, Any]:
    meta = (pf.schema_arrow.metadata or {}).get(b"gradlens")
    if meta:
        info = json.loads(meta)
        if "global" in info:
            return {**info, "rows": pf.metadata.num_rows}
    import pyarrow.compute as pc  # a part written without the metadata: read three columns

    t = pf.read(columns=["step", "layer", "stat"])
    is_global = pc.equal(t["layer"], GLOBAL)
    return {"steps": sorted(pc.unique(t["step"]).to_pylist()),
            "stats": sorted(pc.unique(t.filter(pc.invert(is_global))["stat"]).to_pylist()),
            "global": sorted(pc.unique(t.filter(is_global)["stat"]).to_pylist()),
            "rows": t.num_rows}


def table_info(run: Path, cache: dict[Path, tuple[Any, dict[str, Any]]] | None = None
               ) -> dict[str, Any]:
    """``steps`` (sorted distinct logged steps), ``stats`` (of per-layer rows), ``global``
    (run-level statistics) and ``rows`` (stored, duplicates included) of the table, from the
    files' footers. ``cache`` (path -> (size,
    mtime), info) spares the footers of unchanged files: a live run's poll reads only the new
    parts'."""
    cache = {} if cache is None else cache
    steps: set[int] = set()
    stats: set[str] = set()
    glob: set[str] = set()
    todo: list[Path] = []
    infos: list[dict[str, Any]] = []
    for _, _, f in list_parts(run):
        try:
            st = f.stat()
        except OSError:
            continue
        hit = cache.get(f)
        if hit is not None and hit[0] == (st.st_size, st.st_mtime_ns):
            infos.append(hit[1])
        else:
            todo.append(f)
    if todo:
        wanted = set(todo)

        def read_new(f: Path, pf: Any) -> tuple[Path, dict[str, Any]] | None:
            if f not in wanted:
                return None
            st = f.stat()
            info = _part_info(pf)
            cache[f] = ((st.st_size, st.st_mtime_ns), info)
            return f, info

        infos += [x[1] for x in _each_file(run, read_new, only=wanted) if x is not None]
    rows = 0
    for info in infos:
        rows += int(info["rows"])
        steps.update(info["steps"])
        stats.update(info["stats"])
        glob.update(info.get("global", []))
    return {"steps": sorted(steps), "stats": sorted(stats), "global": sorted(glob),
            "rows": rows}
