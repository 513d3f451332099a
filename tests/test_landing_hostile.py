"""The landing zone against hostile producers: links and special files are refused by name and
never read, decompressed size and line length are capped, any file name the filesystem allows
is ingested, many small files are cheap, and everything the project writes is private."""

import gzip
import json
import os
import stat
import subprocess
import sys
import threading
import tracemalloc

import pandas as pd
import pytest
from test_feedback_store import KEY, ROWS, write_jsonl

from rec_models.data.privacy import KEY_ENV
from rec_pipelines.lake import FeedbackStore, IngestLimits
from rec_pipelines.lake.landing import place

SECRET = "root:x:0:0:secret-line-that-must-never-be-read"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    return FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key=KEY,
                         limits=IngestLimits(max_file_bytes=1 << 20, max_line_bytes=64 * 1024))


def everything_written(store) -> str:
    """Every byte the lake holds, as text (Parquet files included, lossy)."""
    return "".join(path.read_bytes().decode("utf-8", "replace") for path in store.lake.rglob("*") if path.is_file())


def test_links_and_special_files_are_refused_by_name_and_never_read(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(SECRET + "\n")
    write_jsonl(outside / "feedback.jsonl", ROWS)  # a valid feedback file, but outside the zone
    folder = store.landing_zone / "events"
    folder.mkdir(parents=True)
    os.symlink(outside / "secret.jsonl", folder / "secret.jsonl")
    os.symlink(outside / "feedback.jsonl", folder / "elsewhere.jsonl")
    os.symlink("/etc/passwd", folder / "passwd.csv")
    os.symlink(outside, folder / "a-folder.jsonl")
    os.mkfifo(folder / "pipe.jsonl")
    write_jsonl(folder / "good.jsonl", ROWS)

    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("report", store.ingest("events")), daemon=True)
    worker.start()
    worker.join(60)  # a FIFO opened for reading would block forever
    assert "report" in done, "ingest blocked on the FIFO"
    report = done["report"]
    assert report.rows_in == len(ROWS) and [b.split("-")[0] for b in report.batches] == ["good"]
    reasons = {q["file"]: q["reason"] for q in report.quarantined_files}
    assert set(reasons) == {f"events/{n}" for n in ("secret.jsonl", "elsewhere.jsonl", "passwd.csv",
                                                     "a-folder.jsonl", "pipe.jsonl")}
    assert all("symbolic link" in reasons[f"events/{n}"] for n in ("secret.jsonl", "elsewhere.jsonl", "passwd.csv",
                                                                     "a-folder.jsonl"))
    assert "named pipe" in reasons["events/pipe.jsonl"]
    written = everything_written(store)
    assert "secret-line" not in written and "root:x" not in written
    assert store.pending_files("events") == [] and store.ingest("events").files == []  # refused once, by name
    records = list((store.lake / "quarantine" / "files" / "events").glob("*.json"))
    assert len(records) == 5 and all(json.loads(r.read_text())["sha256"] is None for r in records)


def test_a_gzip_bomb_is_quarantined_without_being_decompressed_whole(store):
    folder = store.landing_zone / "events"
    folder.mkdir(parents=True)
    line = (json.dumps(ROWS[0]) + "\n").encode()
    (folder / "bomb.jsonl.gz").write_bytes(gzip.compress(line * ((64 << 20) // len(line))))  # 64 MB inside
    write_jsonl(folder / "good.jsonl", ROWS)
    tracemalloc.start()
    try:
        report = store.ingest("events")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.rows_in == len(ROWS)
    [bad] = report.quarantined_files
    assert bad["file"] == "events/bomb.jsonl.gz" and "decompresses to more than 1048576 bytes" in bad["reason"]
    assert peak < 16 << 20  # the 1 MB limit and a few chunks, not 64 MB


def test_oversized_files_lines_and_parquet_are_quarantined_with_the_limit(store):
    folder = store.landing_zone / "events"
    folder.mkdir(parents=True)
    write_jsonl(folder / "big.jsonl", ROWS * 20_000)  # ~2.4 MB
    long_text = {**ROWS[0], "text": "x" * 100_000}
    write_jsonl(folder / "long-line.jsonl", [long_text, *ROWS[1:]])
    pd.DataFrame({**{k: [v] * 20_000 for k, v in ROWS[0].items()},
                  "text": ["x" * 1000] * 20_000}).to_parquet(folder / "wide.parquet")  # small file, 20 MB read
    write_jsonl(folder / "good.jsonl", ROWS)
    assert (folder / "wide.parquet").stat().st_size < 100_000
    report = store.ingest("events")
    reasons = {q["file"]: q["reason"] for q in report.quarantined_files}
    assert "over the limit of 1048576 bytes" in reasons["events/big.jsonl"]
    assert "a line of 100" in reasons["events/long-line.jsonl"] and "65536" in reasons["events/long-line.jsonl"]
    assert "Parquet data of" in reasons["events/wide.parquet"]
    assert report.rows_in == len(ROWS)


def test_any_file_name_the_filesystem_allows_is_ingested(store, tmp_path):
    names = ["a" * 249 + ".jsonl", "new\nline.jsonl", "tab\tand spaces.jsonl", "ünïcödé-名前.jsonl",
             os.fsdecode(b"latin1-\xe9t\xe9.jsonl")]
    source = tmp_path / "sources"
    for i, name in enumerate(names):
        rows = [{**row, "user_id": f"{row['user_id']}-{i}"} for row in ROWS]
        write_jsonl(source / name, rows)
        place(source / name, store.landing_zone / "events")
    write_jsonl(source / "again" / names[0], [{**ROWS[0], "user_id": "other"}])  # same long name, other bytes
    placed = place(source / "again" / names[0], store.landing_zone / "events")
    assert len(os.fsencode(placed.name)) <= 255
    report = store.ingest("events")
    assert not report.quarantined_files and report.rows_in == len(ROWS) * len(names) + 1
    assert len(report.batches) == len(names) + 1
    assert all(batch.isascii() and "\n" not in batch and len(batch) <= 80 for batch in report.batches)
    accounts = store.validate_pending()
    assert sum(a["rows_valid"] for a in accounts) == report.rows_in


def test_many_small_files_are_ingested_and_validated_with_exact_accounting(store):
    folder = store.landing_zone / "events"
    for i in range(300):
        write_jsonl(folder / f"part-{i:05d}.jsonl",
                    [{**row, "user_id": f"u{i}", "timestamp": row["timestamp"] + i} for row in ROWS])
    write_jsonl(folder / "part-99999.jsonl", [{**ROWS[0], "user_id": "u0"}])  # a duplicate of an earlier event
    report = store.ingest("events")
    assert len(report.batches) == 301
    accounts = store.validate_pending()
    assert sum(a["rows_in"] for a in accounts) == 901
    assert sum(a["rows_valid"] for a in accounts) == 900
    [dup] = [a for a in accounts if a["rows_quarantined"]]
    assert dup["reasons"] == {"duplicate of an event in an earlier batch": 1}


def test_the_lake_mlflow_store_and_run_state_are_private(tmp_path, tiny_encoder_dir):
    from conftest import REPO_ROOT

    home = tmp_path / "home"
    home.mkdir()
    write_jsonl(tmp_path / "in" / "events.jsonl", ROWS)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_"))},
           "RECSYS_HOME": str(home), "RECSYS_TEXT_MODEL": str(tiny_encoder_dir)}
    recsys = [sys.executable, "-m", "rec_pipelines.cli"]
    done = subprocess.run([*recsys, "ingest", str(tmp_path / "in" / "events.jsonl")], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    registry = ("from rec_pipelines.settings import prepare_environment; s = prepare_environment(); "
                "from rec_pipelines.registry import ModelRegistry; "
                "ModelRegistry(s.mlflow_tracking_uri, s.mlflow_artifact_root, s.model_name).experiment_id()")
    subprocess.run([sys.executable, "-c", registry], env=env, cwd=REPO_ROOT, check=True, timeout=300)
    created = [p for p in home.rglob("*") if not p.is_symlink()]
    assert any(p.name == "ledger.jsonl" for p in created) and any(p.name == "mlflow.db" for p in created)
    assert any("quarantine" not in str(p) and p.suffix == ".parquet" for p in created)
    assert any(p.parent.name == "dagster_home" or "dagster_home" in p.parts for p in created)
    loose = [f"{p.relative_to(home)} {stat.filemode(p.stat().st_mode)}" for p in created if p.stat().st_mode & 0o077]
    assert loose == []


def test_quarantine_csv_export_neutralises_formulas(recsys_env, capsys):
    import csv

    from rec_pipelines.cli import main

    store = FeedbackStore(recsys_env.landing_location, recsys_env.lake, key_file=recsys_env.pseudonym_key_file)
    formulas = ["=HYPERLINK(\"http://evil\")", "+1+1", "-2+3", "@SUM(A1)"]
    rows = [{**ROWS[1], "item_id": formula, "value": 99.0, "text": formula} for formula in formulas]  # bad ratings
    write_jsonl(store.landing_zone / "events" / "formulas.jsonl", [*rows, ROWS[0]])
    store.ingest("events")
    [account] = store.validate_pending()
    assert account["rows_quarantined"] == len(formulas)
    assert sorted(store.quarantined_rows()["item_id"]) == sorted(formulas)  # the lake keeps values verbatim

    out = recsys_env.home / "quarantine.csv"
    assert main(["quarantine", "--csv", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == len(formulas) and summary["by_reason"] == {"rating outside [0.5, 5.0]": len(formulas)}
    with open(out, newline="", encoding="utf-8") as handle:
        exported = list(csv.DictReader(handle))
    assert sorted(row["item_id"] for row in exported) == sorted("'" + formula for formula in formulas)
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in exported for cell in row.values())
