"""The ingestion assets on a real Dagster instance: per-batch accounting, features with
configurable weights and bot flags, events ahead of their catalog entry, the blocking Great
Expectations check stopping training, and `recsys ingest`."""

import json
import pickle

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from conftest import TINY_RUN_CONFIG

from rec_models.data.privacy import pseudonymize
from rec_pipelines import training
from rec_pipelines.defs.ingestion.assets import INGESTION_ASSETS
from rec_pipelines.lake import FeedbackStore
from rec_pipelines.training import (
    StaleTrainingData,
    TrainingDataRef,
    microbatch_users,
    training_record,
    unseen_batches,
)

T = 1_700_000_040  # a minute boundary


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def materialize(instance, defs, run_config=None, asset_selection=None, **kwargs):
    return defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, run_config=run_config or {},
        asset_selection=asset_selection or [dg.AssetKey(a) for a in INGESTION_ASSETS], **kwargs)


def metadata(result, asset):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def check(result, name):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.asset_check_key.name == name]
    return evaluation


def test_per_batch_accounting_features_and_catalog_lag(dagster_env, small_simulator):
    settings, defs, instance = dagster_env
    events = settings.landing_zone / "events"
    small_simulator.write_batch(settings.landing_zone, 0)
    bot = [{"user_id": "bot-1", "item_id": f"i{k:05d}", "event_type": "click", "timestamp": T + m * 60 + k}
           for m in range(4) for k in range(40)]  # 40 clicks a minute, four minutes running
    write_jsonl(events / "bot.jsonl", bot)
    write_jsonl(events / "mixed.jsonl", [
        {"user_id": "v1", "item_id": "brand-new-item", "event_type": "purchase", "timestamp": T},
        {"user_id": "v1", "item_id": "i00002", "event_type": "rating", "value": 9, "timestamp": T + 1},
        {"user_id": "v2", "item_id": "i00003", "event_type": "view", "timestamp": 1_500_000_000},
    ])
    config = {"ops": {"validated_feedback": {"config": {"min_timestamp": 1_600_000_000}},
                      "feedback_features": {"config": {"event_weights": {"purchase": 5.0, "skip": -3.0}}}}}
    first = materialize(instance, defs, config)
    assert first.success

    meta = metadata(first, "validated_feedback")
    accounting = {a["file"]: a for a in meta["batch_accounting"]}
    assert set(accounting) == {"events/events-00000.jsonl", "events/bot.jsonl", "events/mixed.jsonl"}
    for account in accounting.values():
        assert account["rows_in"] == account["rows_valid"] + account["rows_quarantined"]
    assert accounting["events/bot.jsonl"]["rows_valid"] == 160  # flagged later, never dropped
    assert accounting["events/mixed.jsonl"]["reasons"] == {
        "rating outside [0.5, 5.0]": 1, "timestamp before the floor (2020-09-13)": 1}
    assert meta["rows_in"] == sum(a["rows_in"] for a in accounting.values())
    assert meta["rows_in"] == meta["rows_valid"] + meta["rows_quarantined"] and meta["rows_quarantined"] == 2

    features = first.output_for_node("feedback_features")
    [bot_id, v1] = pseudonymize(["bot-1", "v1"], FeedbackStore(settings.landing_zone, settings.lake).pseudonym_key())
    users = features.users.set_index("user_id")
    assert users.loc[bot_id, "bot_like"] and users.loc[bot_id, "peak_events_per_minute"] == 40
    assert users["bot_like"].sum() == 1 and metadata(first, "feedback_features")["bot_like_users"] == 1
    assert users.loc[v1, "engagement"] == 5.0 and features.weights["skip"] == -3.0  # configured weights
    assert features.items.set_index("item_id").loc["brand-new-item", "events"] == 1

    # Flagged users stay out of training and evaluation (counted), unless configured otherwise.
    training = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("training_data")])
    assert bot_id not in training.output_for_node("training_data").load().sequences.user_ids
    assert metadata(training, "training_data")["bot_users_excluded"] == 1
    assert metadata(training, "training_data")["bot_interactions_excluded"] == 40  # 40 items, each clicked 4 times
    kept = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("training_data")],
        run_config={"ops": {"training_data": {"config": {"exclude_bots": False}}}})
    assert bot_id in kept.output_for_node("training_data").load().sequences.user_ids
    assert metadata(kept, "training_data")["bot_interactions_excluded"] == 0

    # A bot arriving in a micro-batch that does not refresh feedback_features (the sensor's runs
    # reuse it) is flagged by training_data's own update, from the rows of the users it rebuilds.
    write_jsonl(events / "bot2.jsonl", [{**row, "user_id": "bot-2"} for row in bot])
    assert materialize(instance, defs, config, asset_selection=[dg.AssetKey("raw_feedback"),
                                                                dg.AssetKey("validated_feedback")]).success
    later = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("training_data")])
    [bot2_id] = pseudonymize(["bot-2"], FeedbackStore(settings.landing_zone, settings.lake).pseudonym_key())
    assert {bot_id, bot2_id}.isdisjoint(later.output_for_node("training_data").load().sequences.user_ids)
    assert metadata(later, "training_data")["table_users_rebuilt"] == 1  # bot-2 alone
    assert metadata(later, "training_data")["bot_users_flagged_in_table"] == 2
    assert metadata(later, "training_data")["bot_users_excluded"] == 2
    # ... and stays out when the next batch does not touch it (the flag is kept with the table)
    write_jsonl(events / "person.jsonl", [{"user_id": "p1", "item_id": f"i{k:05d}", "event_type": "view",
                                           "timestamp": T + 3600 * k} for k in range(6)])
    assert materialize(instance, defs, config, asset_selection=[dg.AssetKey("raw_feedback"),
                                                                dg.AssetKey("validated_feedback")]).success
    next_run = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("training_data")])
    assert metadata(next_run, "training_data")["table_users_rebuilt"] == 1  # p1 alone
    assert {bot_id, bot2_id}.isdisjoint(next_run.output_for_node("training_data").load().sequences.user_ids)

    catalog_check = check(first, "events_with_catalog_entry")  # kept and reported, not quarantined
    assert catalog_check.metadata["events_without_catalog_entry"].value == 1
    assert "brand-new-item" in first.output_for_node("validated_feedback").read()["item_id"].tolist()

    # A second batch: the accounting covers only the new batch; the catalog entry catches up.
    write_jsonl(events / "later.jsonl", [{"user_id": "v3", "item_id": "i00004", "event_type": "like", "timestamp": T}])
    write_jsonl(settings.landing_zone / "catalog" / "late.jsonl",
                [{"item_id": "brand-new-item", "title": "A Late Arrival", "description": "write to a@b.example"}])
    second = materialize(instance, defs, config)
    meta = metadata(second, "validated_feedback")
    assert [a["file"] for a in meta["batch_accounting"]] == ["events/later.jsonl"]
    assert (meta["rows_in"], meta["rows_valid"], meta["rows_quarantined"]) == (1, 1, 0)
    assert meta["rows"] == len(second.output_for_node("validated_feedback").read()) == second.output_for_node("validated_feedback").rows
    assert check(second, "events_with_catalog_entry").metadata["events_without_catalog_entry"].value == 0
    entry = second.output_for_node("item_catalog").set_index("item_id").loc["brand-new-item"]
    assert entry["description"] == "write to [email]"  # scrubbed before it is stored or embedded


def test_a_failed_expectation_suite_stops_training_on_that_batch(dagster_env, small_simulator, monkeypatch):
    settings, defs, instance = dagster_env
    small_simulator.write_batch(settings.landing_zone, 0)
    # A defect upstream: ids reach the lake without their pseudonym. Every row rule still
    # passes, the Great Expectations suite (stricter: the pseudonym pattern) does not.
    monkeypatch.setattr("rec_pipelines.lake.store.pseudonymize", lambda ids, key, prefix: ids)
    result = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, run_config=TINY_RUN_CONFIG, raise_on_error=False)

    assert not result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "validated_feedback" in materialized
    assert not materialized & {"training_data", "candidate_model", "feedback_features"}
    suite = check(result, "feedback_expectations")
    assert not suite.passed and suite.severity == dg.AssetCheckSeverity.ERROR
    assert suite.metadata["failed"].value == 1 and "match_regex" in suite.metadata["failing_examples"].value
    [batch] = suite.metadata["rejected_batches"].value

    store = FeedbackStore(settings.landing_zone, settings.lake)
    account = store.account(batch)
    assert account["rows_valid"] == 0 and account["rows_quarantined"] == account["rows_in"] > 0
    assert store.read_validated().empty  # a later run never trains on it either
    reasons = store.quarantined_rows(batch)["reason"].unique().tolist()
    assert reasons == ["batch failed the Great Expectations suite: expect_column_values_to_match_regex(user_id)"]


def test_recsys_ingest_prints_one_json_line(recsys_env, tmp_path, capsys):
    from rec_pipelines.cli.ingest import main, place

    settings = recsys_env
    good, bad = tmp_path / "in" / "good.csv", tmp_path / "in" / "garbage.jsonl"
    good.parent.mkdir()
    pd.DataFrame({"user_id": ["a", "b", "c"], "item_id": ["i1", "i2", "i3"], "event_type": ["view", "skip", "rating"],
                  "value": [None, None, 7.0], "timestamp": [T, T + 1, T + 2]}).to_csv(good, index=False)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert main([str(good), str(bad)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files"] == ["events/garbage.jsonl", "events/good.csv"]
    assert (summary["rows_in"], summary["rows_valid"], summary["rows_quarantined"]) == (3, 2, 1)
    assert [q["file"] for q in summary["quarantined_files"]] == ["events/garbage.jsonl"]
    assert "not UTF-8" in summary["quarantined_files"][0]["reason"]
    assert summary["checks"]["feedback_expectations"] is True
    landed = sorted(p.name for p in (settings.landing_zone / "events").iterdir())
    assert landed == ["garbage.jsonl", "good.csv"]  # no temp files left behind

    # Placing the same file again changes nothing; other content under a taken name gets its own.
    assert place(good, settings.landing_zone / "events") == settings.landing_zone / "events" / "good.csv"
    good.write_text("user_id,item_id,event_type,timestamp\nd,i4,click,1700000100\n")
    renamed = place(good, settings.landing_zone / "events")
    assert renamed.name.startswith("good-") and renamed.read_bytes() == good.read_bytes()
    assert len(list((settings.landing_zone / "events").iterdir())) == 3


def test_recsys_ingest_movielens_folder(recsys_env, tmp_path, capsys):
    from rec_pipelines.cli.ingest import main

    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t10\t4\t881250949\n1\t20\t3\t881250950\n2\t10\t5\t891717742\n")
    flags = "|".join(["0"] * 18)
    (folder / "u.item").write_bytes(
        f"10|Caf\xe9 Society (1995)|01-Jan-1995||http://x|1|{flags}\n20|Heat (1995)|01-Jan-1995||http://y|0|{flags}\n"
        .encode("latin-1"))
    assert main(["--movielens", str(folder)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files"] == ["events/movielens-ml-100k.parquet", "catalog/movielens-ml-100k.parquet"]
    assert (summary["rows_in"], summary["rows_valid"], summary["catalog_rows_in"]) == (3, 3, 2)
    store = FeedbackStore(recsys_env.landing_zone, recsys_env.lake)
    assert store.catalog().set_index("item_id").loc["10", "title"] == "Café Society (1995)"
    assert store.read_validated()["user_id"].str.startswith("p_").all()


def test_one_batch_validated_again_from_the_ui_partition(dagster_env, small_simulator):
    """Each ingested batch is a partition of ``event_batch``; materialising one with
    ``revalidate`` applies new rules to that batch alone (nothing lost: its rows move between
    valid and quarantine), and the next training rebuilds the per-user table from them."""
    settings, defs, instance = dagster_env
    events = settings.landing_zone / "events"
    small_simulator.write_batch(settings.landing_zone, 0)
    write_jsonl(events / "old.jsonl", [
        {"user_id": "o1", "item_id": f"i{k:05d}", "event_type": "view", "timestamp": 1_500_000_000 + k} for k in range(6)
    ] + [{"user_id": "o2", "item_id": "i00001", "event_type": "view", "timestamp": T}])
    first = materialize(instance, defs, asset_selection=[dg.AssetKey(a) for a in [*INGESTION_ASSETS, "training_data"]])
    assert first.success
    store = FeedbackStore(settings.landing_zone, settings.lake)
    assert sorted(instance.get_dynamic_partitions("event_batches")) == sorted(store.batches("events"))
    [old] = [a for a in store.accounts() if a["file"] == "events/old.jsonl"]
    assert (old["rows_in"], old["rows_valid"], old["rows_quarantined"]) == (7, 7, 0)
    [o1] = pseudonymize(["o1"], store.pseudonym_key())
    before = first.output_for_node("training_data").load()
    assert o1 in before.sequences.user_ids
    others = [a for a in store.accounts() if a["batch_id"] != old["batch_id"]]

    from rec_pipelines.defs.ingestion.assets import event_batch

    def revalidate(**rules):
        result = dg.materialize([event_batch], partition_key=old["batch_id"], instance=instance,
                                resources=defs.resources,
                                run_config={"ops": {"event_batch": {"config": {"revalidate": True, **rules}}}})
        assert result.success
        return metadata(result, "event_batch")

    # A stricter floor for this batch: o1's six old views go to quarantine, o2's view stays.
    strict = revalidate(min_timestamp=1_600_000_000)
    assert (strict["rows_in"], strict["rows_valid"], strict["rows_quarantined"]) == (7, 1, 6)
    assert strict["quarantine_reasons"] == {"timestamp before the floor (2020-09-13)": 6}
    assert len(store.quarantined_rows(old["batch_id"])) == 6 and len(store.read_validated([old["batch_id"]])) == 1
    assert [a for a in store.accounts() if a["batch_id"] != old["batch_id"]] == others  # other batches untouched
    after = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("validated_feedback"), dg.AssetKey("training_data")])
    assert metadata(after, "training_data")["table_update"] == "rebuilt"
    now = after.output_for_node("training_data").load()
    assert o1 not in now.sequences.user_ids

    # Validated again under the default rules, the rows come back from quarantine.
    restored = revalidate()
    assert (restored["rows_in"], restored["rows_valid"], restored["rows_quarantined"]) == (7, 7, 0)
    assert store.quarantined_rows(old["batch_id"]).empty
    again = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("validated_feedback"), dg.AssetKey("training_data")])
    assert metadata(again, "training_data")["table_update"] == "rebuilt"
    restored_data = again.output_for_node("training_data").load()
    assert o1 in restored_data.sequences.user_ids
    # A model trained on the stricter rows sees this batch as new again (validated again since),
    # and only it: a micro-batch fine-tunes on its restored user o1, not taking the batch as consumed.
    assert restored_data.validated_at[old["batch_id"]] > now.validated_at[old["batch_id"]]
    record = json.loads(json.dumps(training_record(now, now.batches)))  # as stored in batches.json
    assert unseen_batches(restored_data, record) == [old["batch_id"]]
    assert unseen_batches(restored_data, {"batches": now.batches}) == []  # a record without times: all seen
    fresh = microbatch_users(restored_data, {old["batch_id"]}, replay=0, seed=0)
    assert [restored_data.split.train.user_ids[i] for i in fresh] == [o1]

    # training_data hands over a reference to the lake's table, not the history: a few hundred
    # bytes that load the same data again in a fresh process; a table stored since refuses it.
    ref = again.output_for_node("training_data")
    assert isinstance(ref, TrainingDataRef) and len(pickle.dumps(ref)) < 2_000
    built = ref.load()
    training.LOADED_DATA.clear()  # as in another process
    loaded = ref.load()
    assert loaded is not built and loaded.sequences.user_ids == built.sequences.user_ids and loaded.batches == built.batches
    assert all(np.array_equal(a, b) for a, b in zip(loaded.split.train.items, built.split.train.items))
    assert np.array_equal(loaded.split.test_targets, built.split.test_targets)
    assert loaded.user_batches == built.user_batches and loaded.vocab.ids == built.vocab.ids
    with pytest.raises(StaleTrainingData, match="materialise training_data again"):
        after.output_for_node("training_data").load()

    # A suite that fails (the asset runs Great Expectations there) rejects the batch whole,
    # under the lake's lock and before any of its rows is written as valid.
    account = store.revalidate(old["batch_id"], suite=lambda rows: f"suite failed on {len(rows)} rows")
    assert account["rejected"] == "suite failed on 7 rows" == store.account(old["batch_id"])["rejected"]
    assert (account["rows_valid"], account["rows_quarantined"]) == (0, 7)
    assert old["batch_id"] not in store.validated_events().batches
    assert store.quarantined_rows(old["batch_id"])["reason"].tolist() == ["suite failed on 7 rows"] * 7


def test_validated_feedback_compacts_small_batches_training_reads_the_same(dagster_env, small_simulator):
    """Batch files validated by earlier runs are compacted by the next ``validated_feedback``
    once enough wait; the per-user table is not rebuilt for it and equals a build from scratch,
    and a compacted batch is still its own partition to validate again."""
    settings, defs, instance = dagster_env
    events = settings.landing_zone / "events"
    small_simulator.write_batch(settings.landing_zone, 0)
    for n in range(3):
        write_jsonl(events / f"small-{n}.jsonl", [
            {"user_id": f"s{n}", "item_id": f"i{k:05d}", "event_type": "view", "timestamp": T + 10 * n + k}
            for k in range(6)])
    compact = {"ops": {"validated_feedback": {"config": {"compact_min_files": 2}}}}
    selection = [dg.AssetKey(a) for a in [*INGESTION_ASSETS, "training_data"]]
    first = materialize(instance, defs, compact, asset_selection=selection)
    assert metadata(first, "validated_feedback")["compaction"]["compacted_batches"] == 0  # none validated before

    write_jsonl(events / "small-3.jsonl", [
        {"user_id": "s0", "item_id": "i00009", "event_type": "click", "timestamp": T + 100}])
    second = materialize(instance, defs, compact, asset_selection=selection)
    assert metadata(second, "validated_feedback")["compaction"] == {
        "compacted_batches": 4, "files_written": 1, "small_files": 4, "retired_deleted": 0, "orphans_deleted": 0}
    assert metadata(second, "training_data")["table_update"] == "incremental"
    incremental = second.output_for_node("training_data").load().sequences

    (settings.lake / "tables" / "user_sequences.parquet").unlink()
    scratch = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("training_data")])
    assert metadata(scratch, "training_data")["table_update"] == "built"
    rebuilt = scratch.output_for_node("training_data").load().sequences
    assert incremental.user_ids == rebuilt.user_ids and len(rebuilt.user_ids) > 4
    for a, b in zip(incremental.items + incremental.event_types, rebuilt.items + rebuilt.event_types):
        assert a.tolist() == b.tolist()

    from rec_pipelines.defs.ingestion.assets import event_batch

    store = FeedbackStore(settings.landing_zone, settings.lake)
    [small] = [a["batch_id"] for a in store.accounts() if a["file"] == "events/small-1.jsonl"]
    rows = store.validated_events().rows
    result = dg.materialize([event_batch], partition_key=small, instance=instance, resources=defs.resources,
                            run_config={"ops": {"event_batch": {"config": {"revalidate": True,
                                                                           "min_timestamp": T + 13}}}})
    assert (metadata(result, "event_batch")["rows_valid"], metadata(result, "event_batch")["rows_quarantined"]) == (3, 3)
    assert len(store.read_validated([small])) == 3 and store.validated_events().rows == rows - 3
