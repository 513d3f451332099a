"""`recsys demo` end to end on a small simulator: it runs, and running it again adds the next
batch without duplicating any data."""

from conftest import TINY_RUN_CONFIG

from rec_pipelines.cli.demo import run_demo
from rec_pipelines.lake import FeedbackStore


def test_demo_runs_twice_without_duplicating_data(recsys_env, small_simulator, capsys):
    settings = recsys_env
    assert run_demo(settings, simulator=small_simulator, run_config=TINY_RUN_CONFIG) == 0
    out = capsys.readouterr().out
    assert "sensor requested a run of microbatch_retrain_job" in out
    assert "Top-10 recommendations from models:/recsys-sasrec@champion" in out
    assert out.count("    10. ") == 3  # three users, ten titles each
    store = FeedbackStore(settings.landing_zone, settings.lake)
    assert [b.split("-")[1] for b in store.batches("events")] == ["00000", "00001"]  # ledger readable
    rows_after_first = len(store.read("events"))

    assert run_demo(settings, simulator=small_simulator, run_config=TINY_RUN_CONFIG) == 0
    out = capsys.readouterr().out
    assert "A champion exists already" in out
    batches = store.batches("events")
    assert [b.split("-")[1] for b in batches] == ["00000", "00001", "00002"]
    events = store.read("events")
    assert len(events) == rows_after_first + len(small_simulator.events(2))
    assert not events.duplicated(["batch_id", "source_row"]).any()  # no source row stored twice
