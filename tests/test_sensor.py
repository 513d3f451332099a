"""The landing-zone sensor on a real Dagster instance: each new file starts exactly one run
(cursor + run key), across restarts; files still being written are invisible; many small
files go into one run; files landing while a retrain is active wait for the next one."""

import json
import os

import dagster as dg
import pytest

from rec_pipelines.defs.ingestion.assets import INGESTION_ASSETS
from rec_pipelines.defs.training.automation import RETRAIN_TAGS
from rec_pipelines.lake import FeedbackStore


def event_line(user: str, i: int) -> str:
    return json.dumps({"user_id": user, "item_id": f"i{i}", "event_type": "view", "timestamp": 1_700_000_000 + i}) + "\n"


def land(folder, name: str, rows: int = 3, user: str = "u1") -> None:
    """Write like a producer must: hidden temp name, then an atomic rename."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_text("".join(event_line(f"{user}-{name}", i) for i in range(rows)))
    os.replace(tmp, folder / name)


def tick(defs, instance, cursor=None):
    sensor = defs.resolve_sensor_def("landing_zone_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources) as ctx:
        return sensor.evaluate_tick(ctx)


def run_ingestion(defs, instance, request):
    """Execute the requested run's ingestion assets (training is not this test's business)."""
    result = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, tags=request.tags, asset_selection=[dg.AssetKey(a) for a in INGESTION_ASSETS])
    assert result.success
    return result


def test_each_new_file_starts_exactly_one_run_across_restarts(dagster_env):
    settings, defs, instance = dagster_env
    events = settings.landing_zone / "events"
    land(events, "a.jsonl")
    first = tick(defs, instance)
    assert len(first.run_requests) == 1 and first.run_requests[0].tags["recsys/files"] == "1"

    # The next tick (cursor kept) does not ask again, although the run has not ingested yet.
    again = tick(defs, instance, first.cursor)
    assert again.run_requests == [] and "wait for their run" in again.skip_message
    # A lost cursor gives the same run key, which Dagster never starts twice.
    assert tick(defs, instance).run_requests[0].run_key == first.run_requests[0].run_key

    run_ingestion(defs, instance, first.run_requests[0])
    after = tick(defs, instance, again.cursor)
    assert after.run_requests == [] and after.skip_message == "no new files in the landing zone"
    assert json.loads(after.cursor) == {"requested": {}}  # ingested files leave the cursor

    # "Restart": fresh definitions, a fresh instance handle, the stored cursor.
    from rec_pipelines.definitions import defs as load_defs

    land(events, "b.jsonl")
    with dg.DagsterInstance.get() as restarted:
        second = tick(load_defs(), restarted, after.cursor)
    assert [r.tags["recsys/files"] for r in second.run_requests] == ["1"]  # b only: a is not asked for again
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert json.loads(second.cursor)["requested"].keys() == {"events/b.jsonl"}

    # New content under an old name is new data: one more run.
    (events / "a.jsonl").write_text(event_line("u9", 99))
    changed = tick(defs, instance, second.cursor)
    assert len(changed.run_requests) == 1


def test_files_still_being_written_are_never_read(dagster_env):
    settings, defs, instance = dagster_env
    events = settings.landing_zone / "events"
    events.mkdir(parents=True)
    (events / ".hidden.jsonl.tmp").write_text(event_line("u1", 1))
    (events / "upload.jsonl.part").write_text(event_line("u1", 2))
    (events / "marked.jsonl.writing").touch()  # marker first, then the file itself
    (events / "marked.jsonl").write_text(event_line("u1", 3)[:20])  # half written
    assert tick(defs, instance).run_requests == []

    with open(events / "marked.jsonl", "w") as handle:
        handle.write(event_line("u1", 3))
    (events / "marked.jsonl.writing").unlink()  # the producer is done
    os.replace(events / "upload.jsonl.part", events / "upload.jsonl")
    done = tick(defs, instance)
    assert done.run_requests[0].tags["recsys/files"] == "2"
    run_ingestion(defs, instance, done.run_requests[0])
    store = FeedbackStore(settings.landing_zone, settings.lake)
    accounts = store.accounts()
    assert sorted(a["file"] for a in accounts) == ["events/marked.jsonl", "events/upload.jsonl"]
    assert all(a["rows_in"] == a["rows_valid"] == 1 for a in accounts)  # the complete content, never the half


def test_many_small_files_go_into_one_run_and_wait_while_a_retrain_is_active(dagster_env):
    settings, defs, instance = dagster_env
    events = settings.landing_zone / "events"
    queued = instance.create_run_for_job(
        defs.resolve_job_def("microbatch_retrain_job"), tags=RETRAIN_TAGS, status=dg.DagsterRunStatus.STARTED)
    cursor = None
    for i in range(20):  # files keep landing while a retrain runs
        land(events, f"small-{i:02d}.jsonl", rows=2)
        result = tick(defs, instance, cursor)
        assert result.run_requests == [] and queued.run_id in result.skip_message
        cursor = result.cursor
    instance.delete_run(queued.run_id)

    batched = tick(defs, instance, cursor)
    assert len(batched.run_requests) == 1 and batched.run_requests[0].tags["recsys/files"] == "20"
    result = run_ingestion(defs, instance, batched.run_requests[0])
    accounting = next(e.materialization.metadata for e in result.get_asset_materialization_events()
                      if e.asset_key.to_user_string() == "validated_feedback")["batch_accounting"].value
    assert len(accounting) == 20 and all(a["rows_in"] == a["rows_valid"] == 2 for a in accounting)
    assert tick(defs, instance, batched.cursor).run_requests == []


def test_files_of_a_run_that_failed_before_ingesting_are_asked_for_again(dagster_env):
    settings, defs, instance = dagster_env
    land(settings.landing_zone / "events", "a.jsonl")
    first = tick(defs, instance)
    request = first.run_requests[0]
    # The daemon creates the run under the request's run key; it dies before ingesting.
    run = instance.create_run_for_job(defs.resolve_job_def("microbatch_retrain_job"),
                                      tags={**request.tags, "dagster/run_key": request.run_key})
    waiting = tick(defs, instance, first.cursor)
    assert waiting.run_requests == [] and "wait for their run" in waiting.skip_message  # still running
    instance.report_run_failed(run)

    again = tick(defs, instance, waiting.cursor)
    assert len(again.run_requests) == 1 and again.run_requests[0].tags["recsys/files"] == "1"
    assert again.run_requests[0].run_key != request.run_key  # a new key: Dagster would drop the old one
    assert tick(defs, instance, again.cursor).run_requests == []  # asked once, not at every tick
    run_ingestion(defs, instance, again.run_requests[0])
    assert json.loads(tick(defs, instance, again.cursor).cursor) == {"requested": {}}


def test_a_remote_fsspec_landing_zone_is_read_through_its_mirror(recsys_env, monkeypatch):
    """Any fsspec URL can be the landing zone (memory:// stands in for s3://bucket/prefix)."""
    import fsspec

    from rec_pipelines.definitions import defs as load_defs
    from rec_pipelines.settings import Settings

    monkeypatch.setenv("RECSYS_LANDING_ZONE", "memory://recsys-test/landing")
    settings = Settings.from_env()
    assert settings.landing_location == "memory://recsys-test/landing"
    fs = fsspec.filesystem("memory")
    fs.pipe("/recsys-test/landing/events/a.jsonl", "".join(event_line("remote-u", i) for i in range(3)).encode())
    fs.pipe("/recsys-test/landing/events/.b.jsonl.tmp", event_line("remote-u", 9).encode())  # still being written
    fs.pipe("/recsys-test/landing/events/c.jsonl.writing", b"")  # marker: c is not complete
    fs.pipe("/recsys-test/landing/events/c.jsonl", event_line("remote-u", 5)[:10].encode())
    try:
        defs = load_defs()
        with dg.DagsterInstance.get() as instance:
            first = tick(defs, instance)
            assert [r.tags["recsys/files"] for r in first.run_requests] == ["1"]
            run_ingestion(defs, instance, first.run_requests[0])
            fs.rm("/recsys-test/landing/events/c.jsonl.writing")  # the producer finished c
            fs.pipe("/recsys-test/landing/events/c.jsonl", event_line("remote-u", 5).encode())
            second = tick(defs, instance, first.cursor)
            assert [r.tags["recsys/files"] for r in second.run_requests] == ["1"]
            run_ingestion(defs, instance, second.run_requests[0])
            assert tick(defs, instance, second.cursor).run_requests == []
        store = FeedbackStore(settings.landing_location, settings.lake)
        assert sorted(a["file"] for a in store.accounts()) == ["events/a.jsonl", "events/c.jsonl"]
        assert [a["rows_valid"] for a in store.accounts()] == [3, 1]
        assert fs.exists("/recsys-test/landing/events/a.jsonl")  # the raw file stays for replay
    finally:
        fs.rm("/recsys-test", recursive=True)


def test_commands_that_write_into_the_landing_zone_refuse_a_remote_one(monkeypatch):
    from rec_pipelines.settings import Settings

    monkeypatch.setenv("RECSYS_LANDING_ZONE", "s3://bucket/prefix")
    with pytest.raises(SystemExit, match="s3://bucket/prefix"):
        Settings.from_env().local_landing_zone("simulate")
