"""Lake tables: many small Parquet files read as one frame, atomic Parquet writes (local
folders or object storage, ``rec_models.files``)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rec_models.files import as_location, atomic_path, parquet_source
from rec_pipelines.lake.parsing import ROW_COLUMNS


class StaleLakeTable(RuntimeError):
    """A lake table was stored again after an asset handed over a reference to the version it
    wrote: the steps after it must not mix that asset's run with another's. Materialise the
    asset again."""


class BackgroundWrites:
    """Lake-table writes that overlap the caller's next work (one thread; Parquet encoding and
    file writes release the GIL): ``submit(fn, ...)`` starts one; leaving the ``with`` block
    waits for every write and raises the first failure. What is written must not change until
    then. At 10M events the per-user table (0.9 s) is written while ``training_data`` builds
    its sequences. (Writing the item table while ``item_text_embeddings`` draws its plots made
    that step 0.5 s slower: both compete for the two cores.)"""

    def __enter__(self) -> BackgroundWrites:
        self._pool, self._pending = ThreadPoolExecutor(1, thread_name_prefix="lake-write"), []
        return self

    def submit(self, fn, *args, **kwargs) -> None:
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def __exit__(self, *failure) -> None:
        self._pool.shutdown(wait=True)
        if failure[0] is None:  # (the block's own exception wins)
            for write in self._pending:
                write.result()


def write_now(fn, *args, **kwargs) -> None:
    """``BackgroundWrites.submit`` for a caller without a ``BackgroundWrites``: writes at once."""
    fn(*args, **kwargs)


class LastCopy:
    """This process's copy of what an asset built for the reference it handed over (one at a
    time: a run's), so a step in the same process (the in-process executor) reads nothing
    again. ``get`` gives it only for an equal reference (None otherwise)."""

    def __init__(self) -> None:
        self.clear()

    def get(self, ref):
        return self._value if self._ref is not None and self._ref == ref else None

    def keep(self, ref, value) -> None:
        self._ref, self._value = ref, value

    def clear(self) -> None:
        self._ref = self._value = None


def read_parquets(paths: list[Path], columns: list[str] | None = None) -> pd.DataFrame:
    """Several Parquet files as one frame, in order, converted to pandas once."""
    return read_arrow(paths, columns).to_pandas()


def read_arrow(paths: list[Path], columns: list[str] | None = None) -> pa.Table:
    """Single-threaded reads: for many small files about 4x faster than ``pq.read_table`` each
    (no dataset or thread-pool set-up per file). A column an older file lacks (such as
    ``request_id``) comes back as nulls."""
    tables = []
    for path in paths:
        source = pq.ParquetFile(parquet_source(path), pre_buffer=False)
        present = None if columns is None else [c for c in columns if c in source.schema_arrow.names]
        table = source.read(columns=present, use_threads=False)
        for name in [c for c in columns or [] if c not in table.column_names]:
            table = table.append_column(name, pa.nulls(len(table), pa.string()))
        tables.append(table.select(columns) if columns else table)
    return pa.concat_tables(tables, promote_options="permissive")


@dataclass(frozen=True)
class ValidatedEvents:
    """A handle on the lake's validated events, what the ``validated_feedback`` asset hands
    over instead of a copy of the history: the batches it covers and their row count. Readers
    take only the columns they need, from the Parquet files, when they need them.
    ``validated_at`` (aligned with ``batches``) says when each was last validated: a batch
    validated again (``FeedbackStore.revalidate``) has changed under the same id."""

    lake: str
    batches: tuple[str, ...]
    rows: int
    validated_at: tuple[float, ...] = ()

    def sources(self) -> list[tuple[Path, frozenset[str] | None]]:
        """The files holding these batches, in ingestion order: ``(path, None)`` to read whole,
        ``(path, batch ids)`` for a compacted file of which only those batches are wanted. The
        compaction manifest is read now, so a handle made before a compaction still reads."""
        lake = as_location(self.lake)
        home = compacted_batches(lake)
        wanted, done, sources = set(self.batches), set(), []
        for batch in self.batches:
            name = home.get(batch)
            if name is None:
                sources.append((lake / "validated" / f"{batch}.parquet", None))
            elif name not in done:
                done.add(name)
                members = {b for b, n in home.items() if n == name}
                sources.append((lake / "validated" / name, None if members <= wanted else frozenset(members & wanted)))
        return sources

    def read(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The events (in ingestion order), all columns or only ``columns``."""
        columns = list(columns) if columns is not None else ROW_COLUMNS
        return self.read_table(columns).to_pandas() if self.batches else empty_events()[columns]

    def read_table(self, columns: Sequence[str]) -> pa.Table:
        """``columns`` of the events (in ingestion order) as one Arrow table."""
        sources = self.sources()
        if all(part is None for _, part in sources):  # (no compacted file read in part: one pass over the files)
            return read_arrow([path for path, _ in sources], list(columns))
        return pa.concat_tables([read_source(path, part, list(columns)) for path, part in sources],
                                promote_options="permissive")

    def read_users(self, user_ids, columns: Sequence[str]) -> pd.DataFrame:
        """The events of ``user_ids`` only (in ingestion order)."""
        return self.read_matching("user_id", user_ids, columns)

    def read_matching(self, column: str, values, columns: Sequence[str]) -> pd.DataFrame:
        """The events whose ``column`` (a string column among ``columns``) is one of ``values``,
        in ingestion order: filtered in Arrow, so only those rows become pandas rows."""
        if not self.batches:
            return empty_events()[list(columns)]
        wanted = pa.array([str(v) for v in values], pa.string())
        return self.read_where(columns, lambda t: pc.is_in(t[column], value_set=wanted))

    def read_where(self, columns: Sequence[str], keep) -> pd.DataFrame:
        """The rows where ``keep(table)`` (an Arrow table of ``columns`` -> a boolean mask) holds,
        file by file: only one file's rows in memory besides those kept."""
        parts = []
        for path, part in self.sources():
            table = read_source(path, part, list(columns))
            parts.append(table.filter(keep(table)))
        return pa.concat_tables(parts, promote_options="permissive").to_pandas()

    def by_user_shares(self, columns: Sequence[str], rows: int) -> Iterator[pd.DataFrame]:
        """The events in frames of about ``rows`` rows, each holding every row of a share of the
        users (ids in sorted ranges; ingestion order within a frame): for work done user by user,
        in bounded memory. One frame of all events when they are fewer than ``rows``. ``columns``
        must include ``user_id``."""
        shares = -(-self.rows // max(rows, 1))
        if shares <= 1:
            yield self.read(columns)
            return
        for group in np.array_split(np.sort(self.distinct("user_id")), shares):
            if len(group):  # a range of sorted ids: two comparisons per row, no set lookup
                yield self.read_where(columns, lambda t, lo=group[0], hi=group[-1]: _between(t["user_id"], lo, hi))

    def distinct(self, column: str) -> np.ndarray:
        """The distinct values of a string ``column`` (object array, unsorted), read in Arrow:
        no Python string per row."""
        values = [pc.unique(read_source(path, part, [column]).column(0)).cast(pa.string())
                  for path, part in self.sources()]
        if not values:
            return np.zeros(0, dtype=object)
        return pc.unique(pa.chunked_array(values, pa.string())).to_numpy(zero_copy_only=False).astype(object)


COMPACTION_MANIFEST = "compacted.json"
"""``<lake>/validated/compacted.json``: ``{"files": [{"name", "batches"}], "retired": [names]}``,
the compacted files (each the valid rows of consecutive batches, in order) and the files they
replaced, deleted one compaction later (``lake.compaction``)."""


def compaction_manifest(lake) -> dict:
    try:
        return json.loads((as_location(lake) / "validated" / COMPACTION_MANIFEST).read_text())
    except FileNotFoundError:
        return {"files": [], "retired": []}


def compacted_batches(lake) -> dict[str, str]:
    """batch id -> the compacted file (relative to ``<lake>/validated``) that holds its rows."""
    return {batch: entry["name"] for entry in compaction_manifest(lake)["files"] for batch in entry["batches"]}


def read_source(path: Path, batches: frozenset[str] | None, columns: list[str]) -> pa.Table:
    """``columns`` of one file, only the rows of ``batches`` when given (a compacted file)."""
    if batches is None:
        return read_arrow([path], columns)
    table = read_arrow([path], [*columns, "batch_id"] if "batch_id" not in columns else columns)
    table = table.filter(pc.is_in(table["batch_id"].cast(pa.string()), value_set=pa.array(sorted(batches), pa.string())))
    return table.select(columns)


def _between(values, low: str, high: str):
    """low <= value <= high for a string column (code-point order, as Python sorts str)."""
    values = values.cast(pa.string())  # a batch without rows may store the column as null
    return pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high))


def empty_events() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="string") for c in ROW_COLUMNS})
    return frame.astype({"source_row": "int64", "value": "float64", "timestamp": "Int64"})


def write_parquet_atomic(frame: pd.DataFrame, path: Path, durable: bool = True) -> None:
    write_arrow_atomic(pa.Table.from_pandas(frame, preserve_index=False), path, durable)


def write_arrow_atomic(table: pa.Table, path: Path, durable: bool = True,
                       use_dictionary: bool | list[str] = True) -> None:
    """LZ4: as small as the default Snappy here, and reads back about twice as fast.
    ``use_dictionary``: Parquet's dictionary encoding (all columns, none, or those named);
    columns of unique values (ids, texts, vectors) only pay for trying it."""
    with atomic_path(path, durable=durable) as tmp:
        pq.write_table(table, tmp, compression="lz4", use_dictionary=use_dictionary)
