"""Landing zone → lake: reading feedback files exactly once, validating them batch by batch,
and keeping what was read (``docs/lake.md`` has the producers' contract and the layout)."""

from rec_pipelines.lake.landing import (
    KINDS,
    RefusedFile,
    RemoteLandingZone,
    file_sha256,
    fingerprint,
    is_ready,
    is_supported,
    printable,
)
from rec_pipelines.lake.parsing import IngestLimits
from rec_pipelines.lake.store import FeedbackStore, LakeError, load_pseudonym_key
from rec_pipelines.lake.tables import BackgroundWrites, LastCopy, StaleLakeTable, ValidatedEvents, write_now

__all__ = ["KINDS", "FeedbackStore", "IngestLimits", "LakeError", "RefusedFile", "RemoteLandingZone", "file_sha256",
           "fingerprint", "is_ready", "is_supported", "load_pseudonym_key", "printable",
           "BackgroundWrites", "LastCopy", "StaleLakeTable", "ValidatedEvents", "write_now"]
