"""``gradlens export RUN --csv``: any run's table as one CSV file, written file by file.

The CSV is what a ``table_format="csv"`` run would hold (header ``step,layer,role,stat,value``,
``nan``/``inf``/``-inf`` for non-finite values, every row as stored: a resumed run's repeated
steps too, in write order per statistic, so :func:`~gradlens.report.load_run` of the export
equals ``load_run`` of the run). Memory is bounded by one stored file (a parquet part, at most
64 flushes), not by the run. The output is written to a temporary name and renamed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO

from gradlens.atomic_files import text_opener, write_atomic
from gradlens.report.load import PathLike, _run_dir, find_tables, load_run
from gradlens.schema import STAT_COLUMNS

__all__ = ["export_csv"]


def export_csv(run_dir: PathLike, out: PathLike | None = None) -> tuple[Path, int]:
    """Write the table of ``run_dir`` as CSV to ``out`` (default: ``<run_dir>.csv`` beside the
    run directory); ``(path, rows written)``."""
    run = _run_dir(run_dir)
    target = Path(out) if out is not None else run.with_name(f"{run.resolve().name}.csv")
    tables = find_tables(run)

    def write(f: IO[str]) -> int:
        n = 0
        f.write(",".join(STAT_COLUMNS) + "\n")
        if tables is not None and tables[0] == "parquet":
            from gradlens.report._parquet import scan_each

            for t in scan_each(run):
                df = t.to_pandas()
                df.to_csv(f, header=False, index=False, na_rep="nan", lineterminator="\n",
                          float_format=None)
                n += len(df)
        elif tables is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a live run's partial last line
                df = load_run(run, dedupe=False)
            df.to_csv(f, header=False, index=False, na_rep="nan", lineterminator="\n")
            n = len(df)
        return n

    n = write_atomic(target, write, opener=text_opener(newline=""))
    return target, n
