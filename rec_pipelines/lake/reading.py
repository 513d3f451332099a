"""Reading the lake back: batches, rows, the validated events handle, quarantined rows and
the current catalog (the part of ``FeedbackStore`` that never writes)."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from rec_models.data.schema import CATALOG_COLUMNS, IMPRESSION_COLUMNS
from rec_pipelines.lake.conversion import as_tag_list
from rec_pipelines.lake.parsing import ROW_COLUMNS
from rec_pipelines.lake.tables import ValidatedEvents, empty_events, read_parquets


class LakeReads:
    """Mixed into ``FeedbackStore``: uses its ``lake``, ``ledger()`` and ``accounts()``."""

    def batches(self, kind: str) -> list[str]:
        """Ingested batch ids of ``kind`` in ingestion order."""
        return [e["batch_id"] for e in self.ledger() if e["kind"] == kind and e["status"] == "ingested"]

    def read(self, kind: str) -> pd.DataFrame:
        """Every ingested row of ``kind`` in ingestion order (with a ``batch_id`` column; events
        also carry ``source_row`` and ``problem``)."""
        paths = [self.lake / kind / f"{b}.parquet" for b in self.batches(kind)]
        if paths and kind != "catalog":  # many small files (catalog files may differ in types)
            return read_parquets(paths)
        frames = [read_parquets([path]) for path in paths]
        if not frames:
            columns = {"events": [*ROW_COLUMNS, "problem"], "catalog": ["batch_id", *CATALOG_COLUMNS],
                       "impressions": ["batch_id", "source_row", *IMPRESSION_COLUMNS]}[kind]
            return pd.DataFrame(columns=columns)
        return pd.concat(frames, ignore_index=True)

    def ingested_rows(self, kind: str) -> int:
        """How many rows of ``kind`` the lake holds (from the ledger: nothing is read)."""
        return sum(int(e.get("rows", 0)) for e in self.ledger() if e["kind"] == kind and e["status"] == "ingested")

    def read_batch(self, kind: str, batch_id: str) -> pd.DataFrame:
        """The ingested rows of one batch."""
        return read_parquets([self.lake / kind / f"{batch_id}.parquet"])

    def read_validated(self, batch_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Validated events of every (or the given) validated, not rejected batch, in ingestion
        order: the training data's source."""
        return self.validated_events(batch_ids).read()

    def validated_events(self, batch_ids: Iterable[str] | None = None) -> ValidatedEvents:
        """A handle on the validated events of every (or the given) validated, not rejected
        batch; nothing is read."""
        wanted = None if batch_ids is None else set(batch_ids)
        accounts = [a for a in self.accounts() if not a.get("rejected") and (wanted is None or a["batch_id"] in wanted)]
        return ValidatedEvents(str(self.lake), tuple(a["batch_id"] for a in accounts),
                               sum(int(a["rows_valid"]) for a in accounts),
                               tuple(float(a.get("validated_at", 0.0)) for a in accounts))

    def quarantined_rows(self, batch_id: str | None = None) -> pd.DataFrame:
        """Quarantined rows (with ``reason``) of one batch, or of all batches."""
        folder = self.lake / "quarantine" / "rows"
        paths = [folder / f"{batch_id}.parquet"] if batch_id else sorted(folder.glob("*.parquet"))
        frames = [read_parquets([p]) for p in paths if p.exists()]
        return pd.concat(frames, ignore_index=True) if frames else empty_events().assign(reason=pd.Series(dtype="string"))

    def catalog(self) -> pd.DataFrame:
        """The current catalog: later entries for an item replace earlier ones."""
        rows = self.read("catalog")
        rows = rows.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        rows["tags"] = [as_tag_list(v) for v in rows["tags"]]
        return rows
