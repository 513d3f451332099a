"""Every kind of bad input in tests/bad_inputs/ goes through the real sensor and the real
ingestion assets next to a good file: nothing crashes, nothing is dropped silently
(rows_in = rows_valid + rows_quarantined per batch), each file gets the outcome and reasons
that tests/bad_inputs/README.md specifies, and the good rows go through.

One Dagster run takes the whole corpus (as a sensor tick would batch files that land
together); each file is also ingested alone next to a good file through the store."""

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from rec_models.data.privacy import PSEUDONYM_PATTERN
from rec_pipelines.defs.ingestion.assets import INGESTION_ASSETS
from rec_pipelines.lake import FeedbackStore

CORPUS = Path(__file__).parent / "bad_inputs"
GOOD = [{"user_id": f"good-u{i}", "item_id": f"i{i}", "event_type": "click", "value": None,
         "timestamp": 1_700_000_000 + i} for i in range(5)]


def read_table() -> dict[str, dict]:
    """The README table: file -> outcome, rows_in, quarantined, {reason prefix: count}."""
    cases = {}
    for line in (CORPUS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 6 or not cells[0].startswith("`"):
            continue
        name, _, outcome, rows_in, quarantined, reasons = cells
        expected = {"outcome": outcome, "reasons": {}}
        if outcome == "whole file":
            expected["reason"] = reasons
        else:
            expected["rows_in"], expected["quarantined"] = int(rows_in), int(quarantined)
            for part in filter(None, (p.strip() for p in reasons.split(";") if p.strip() != "—")):
                text, count = re.fullmatch(r"(.+) ×(\d+)", part).groups()
                expected["reasons"][text] = int(count)
        cases[name.strip("`")] = expected
    return cases


CASES = read_table()


def write_good(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))


def assert_outcome(name: str, ledger: dict, account: dict | None) -> None:
    expected = CASES[name]
    if expected["outcome"] == "whole file":
        assert ledger["status"] == "quarantined" and account is None, name
        assert expected["reason"] in ledger["reason"], (name, ledger["reason"])
        return
    assert ledger["status"] == "ingested", (name, ledger.get("reason"))
    assert account["rows_in"] == account["rows_valid"] + account["rows_quarantined"]
    assert (account["rows_in"], account["rows_quarantined"]) == (expected["rows_in"], expected["quarantined"]), account
    found = dict(account["reasons"])
    for prefix, count in expected["reasons"].items():
        matching = [r for r in found if r.startswith(prefix)]
        assert sum(found.pop(r) for r in matching) == count, (name, prefix, account["reasons"])
    assert not found, (name, "unexpected reasons", found)


def test_the_table_covers_the_corpus():
    files = {p.name for p in CORPUS.iterdir() if p.name != "README.md"}
    assert set(CASES) == files
    assert len(files) >= 25
    assert {c["outcome"] for c in CASES.values()} == {"whole file", "per row", "accepted"}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """Corpus + a good file in a fresh landing zone; one sensor tick; its run's ingestion assets."""
    from rec_pipelines.definitions import defs as load_defs
    from rec_pipelines.settings import Settings, prepare_environment

    home = tmp_path_factory.mktemp("corpus-home")
    mp = pytest.MonkeyPatch()
    for name in ("RECSYS_LANDING_ZONE", "RECSYS_LAKE", "RECSYS_MLFLOW_ARTIFACTS", "RECSYS_PSEUDONYM_KEY",
                 "RECSYS_PSEUDONYM_KEY_FILE"):
        mp.delenv(name, raising=False)
    mp.setenv("RECSYS_HOME", str(home))
    mp.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    settings = prepare_environment(Settings.from_env())
    folder = settings.landing_zone / "events"
    write_good(folder)
    for name in CASES:
        shutil.copy(CORPUS / name, folder / name)
    defs = load_defs()
    with dg.DagsterInstance.get() as instance:
        sensor = defs.resolve_sensor_def("landing_zone_sensor")
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            tick = sensor.evaluate_tick(context)
        assert len(tick.run_requests) == 1
        request = tick.run_requests[0]
        result = defs.resolve_job_def(sensor.job_name).execute_in_process(
            instance=instance, tags=request.tags, raise_on_error=False,
            asset_selection=[dg.AssetKey(a) for a in INGESTION_ASSETS])
        yield settings, request, result
    mp.undo()


def metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_one_run_takes_the_whole_corpus_and_the_good_rows_go_through(corpus_run):
    settings, request, result = corpus_run
    assert request.tags["recsys/files"] == str(len(CASES) + 1)  # every file, in one run request
    assert result.success  # bad input never crashes the run; the GE suite passes on what went on
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["feedback_expectations"] is True

    validated = result.output_for_node("validated_feedback").read()
    store = FeedbackStore(settings.landing_zone, settings.lake)
    good = store.pseudonymizer()([r["user_id"] for r in GOOD])
    assert validated.loc[validated["batch_id"].str.startswith("good-"), "user_id"].tolist() == good

    meta = metadata(result, "validated_feedback")
    accounting = meta["batch_accounting"]
    assert len(accounting) == sum(c["outcome"] != "whole file" for c in CASES.values()) + 1
    assert meta["rows_in"] == meta["rows_valid"] + meta["rows_quarantined"]
    assert meta["rows_valid"] == len(validated)
    for batch in accounting:  # the quarantine store holds exactly the rows the accounting says
        assert len(store.quarantined_rows(batch["batch_id"])) == batch["rows_quarantined"]
    whole = {q["file"].split("/")[-1] for q in metadata(result, "raw_feedback")["quarantined_files"]}
    assert whole == {n for n, c in CASES.items() if c["outcome"] == "whole file"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_file_in_the_run(corpus_run, name):
    settings, _, _ = corpus_run
    store = FeedbackStore(settings.landing_zone, settings.lake)
    [ledger] = [e for e in store.ledger() if e["file"] == f"events/{name}"]
    assert_outcome(name, ledger, store.account(ledger["batch_id"]) if "batch_id" in ledger else None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_file_alone_next_to_a_good_file(tmp_path, name):
    store = FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key="k" * 32)
    write_good(store.landing_zone / "events")
    shutil.copy(CORPUS / name, store.landing_zone / "events" / name)
    report = store.ingest("events")
    store.validate_pending()
    ledger = {e["file"]: e for e in store.ledger()}
    assert_outcome(name, ledger[f"events/{name}"], store.account(ledger[f"events/{name}"].get("batch_id", "-")))
    good = store.account(ledger["events/good.jsonl"]["batch_id"])
    assert good["rows_in"] == good["rows_valid"] == len(GOOD)
    assert (CORPUS / name).read_bytes() == (store.landing_zone / "events" / name).read_bytes()  # raw kept
    assert len(report.files) == 2


def test_what_reaches_the_lake_is_clean(corpus_run):
    settings, _, _ = corpus_run
    store = FeedbackStore(settings.landing_zone, settings.lake)
    events = store.read("events")
    assert events["user_id"].dropna().str.fullmatch(PSEUDONYM_PATTERN).all()  # no raw ids in the lake
    validated = store.read_validated()
    texts = validated["text"].dropna()
    assert texts.str.len().max() == 5000  # the 20,000-character review, truncated
    assert not texts.str.contains("@example.com").any() and texts.str.contains(r"\[email\]").any()
    assert texts.str.contains(r"\[phone\]").any() and not texts.str.contains("\x00").any()
    stamps = validated.loc[validated["batch_id"].str.startswith("string_timestamps"), "timestamp"].tolist()
    assert stamps == [1_700_000_000, 1_700_000_000]  # ISO 8601 and a fractional stamp, converted
    types = validated.loc[validated["batch_id"].str.startswith("unknown_event_type"), "event_type"]
    assert types.tolist() == ["view", "view", "purchase"]  # " VIEW " normalised
    quarantine_records = list((settings.lake / "quarantine" / "files").rglob("*.json"))
    assert len(quarantine_records) == sum(c["outcome"] == "whole file" for c in CASES.values())
    assert all(json.loads(p.read_text())["reason"] for p in quarantine_records)
    assert pd.api.types.is_integer_dtype(validated["timestamp"])
