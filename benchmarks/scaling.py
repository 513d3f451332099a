"""How the feedback loop scales with the history (default 100k, 1M and 10M events).

    nice -n 19 .venv/bin/python benchmarks/scaling.py [--sizes 100k,1m,10m] [--cap-s 300] [--max-epochs N]
        [--microbatches 2] [--items N] [--stage-timeout-s 900] [--microbatch-timeout-s S] [--model '{"ease": false}']
        [--text-model PATH | --tiny-text] [--sensor-interval 5] [--max-rss-gb G] [--out FILE] [--keep]
        [--data DIR [--generate-only]]

Per size, in a fresh temp home (nothing of yours is touched), four worker processes in turn:

1. generate (not timed): a simulator history of ~SIZE events (SIZE / 40 users of 40 events on
   average; 3k items up to 100k events, then log-linearly to 100k items at 10M; ``--items N``: N at
   every size, which tells the history's growth from the catalog's) in JSON Lines
   files of <= 500k events in the landing zone, made a chunk of users at a time (``events(0)``
   holds users x items matrices: same world, another random stream), and the micro-batches
   (200 users x 10 events + 25 new items each, whatever the size); with ``--data DIR`` they are
   kept in ``DIR/SIZE-Nmb`` (N micro-batches) and the next run with the same ``--data`` and ``--microbatches`` reuses
   them (10M takes about half an hour to generate here); ``--generate-only`` stops after this;
2. ingest: ``FeedbackStore.ingest`` + ``validate_pending`` of it all (``ingest_rows_per_s``; the
   GE suite timed apart);
3. train: ``full_retrain_job`` (nothing new to ingest) as ``dagster job execute`` runs it, in its
   own process, SASRec capped by ``--cap-s`` (``max_time_s`` per network) and ``--max-epochs``:
   ``full_retrain_windows_per_s`` is its ``sequences_per_s`` (training windows/s, first network);
4. microbatch: the real ``dagster-daemon`` (sensor, queued runs); each micro-batch is moved into
   the landing zone and ``microbatch_s`` (median) runs from the drop to a new model version with
   a ``promotion.decision`` (the champion alias moved, or rejected) in the MLflow registry.

``stage_s``: the ingest parts, the full retrain's steps, and per micro-batch the run's sensor and
queue delays and steps. ``peak_rss_mb``: peak of the summed RSS of the pipeline's processes in
phases 2-4 (/proc every 0.5 s): the ingest worker; ``dagster job execute``; the daemon, its code
server and run workers. The benchmark's own processes (this one, and the worker that only
starts and watches the pipeline in phases 3-4) are not counted there but apart, as
``harness_peak_rss_mb``. ``peak_pss_mb`` counts shared pages once. A stage past its timeout or a PSS above
``--max-rss-gb`` is stopped and said in ``status``; the next size still runs. The last line is
one JSON object, a list per field aligned with ``sizes``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from processes import kill_descendants, memory_mb, read_proc, tree  # beside this script

REPO = Path(__file__).resolve().parents[1]
FILE_EVENTS = 500_000  # events per history file (the landing zone refuses files over 1 GiB)
BATCH = {"batch_users": 200, "batch_events_per_user": 10, "batch_new_items": 25}


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def world(size: int, items: int | None = None) -> dict:
    """Simulator sizes for about ``size`` events: 40 events per user, 3k items at 100k events
    growing log-linearly to 100k items at 10M (3k below 100k), or ``items`` at every size."""
    exponent = math.log(100_000 / 3_000) / math.log(100)
    if items is None:
        items = 3_000 if size <= 100_000 else round(3_000 * (size / 100_000) ** exponent)
    return {"n_items": items, "n_users": max(50, round(size / 40)), "events_per_user": 40, **BATCH}


def supervise(phase: str, home: Path, max_pss_gb: float, timeout_s: float) -> tuple[str, dict, dict]:
    """Run one worker phase; return its status and the peak tree RSS and PSS (MB) per stage."""
    progress = home / f"progress-{phase}.jsonl"
    with open(home / f"{phase}.log", "w") as log:
        worker = subprocess.Popen([sys.executable, __file__, "--worker", phase, "--home", str(home)],
                                  stdout=log, stderr=subprocess.STDOUT)
    stage, started, rss, pss, status = phase, time.monotonic(), {}, {}, "ok"
    while worker.poll() is None and status == "ok":
        time.sleep(0.5)
        lines = progress.read_text().splitlines() if progress.exists() else []
        if lines and json.loads(lines[-1])["stage"] != stage:
            stage, started = json.loads(lines[-1])["stage"], time.monotonic()
        harness = {os.getpid(), worker.pid} if phase in DRIVES_ONLY else {os.getpid()}
        usage = [memory_mb(pid) for pid in tree(os.getpid()) if pid not in harness]
        total, shared = sum(u[0] for u in usage), sum(u[1] for u in usage)
        rss[stage], pss[stage] = round(max(rss.get(stage, 0), total), 1), round(max(pss.get(stage, 0), shared), 1)
        own = sum(memory_mb(pid)[0] for pid in harness)
        rss["harness"] = round(max(rss.get("harness", 0), own), 1)
        if shared > max_pss_gb * 1024:
            status = f"stopped by the memory guard (PSS {shared:.0f} MB > {max_pss_gb} GB) in {stage}"
        elif time.monotonic() - started > timeout_s + 60:  # a micro-batch's own timeout comes first
            status = f"timeout in {stage} (> {timeout_s:.0f}s)"
    returncode = worker.poll()
    kill_descendants()
    if status == "ok" and returncode:
        status = f"worker failed in {stage} (exit {returncode}): " + (home / f"{phase}.log").read_text()[-600:]
    return status, rss, pss


def generate(home: Path, spec: dict, stage, out: dict) -> None:
    import numpy as np
    import pandas as pd

    from rec_models.files import write_bytes_atomic
    from rec_models.simulator import FeedbackSimulator, SimulatorConfig, core
    from rec_models.simulator.parameters import _take
    from rec_models.simulator.writing import _to_jsonl

    neighbours, cache = core._neighbours, {}
    # Item neighbours (a minute for 100k items) depend on the items only: once per catalog, not per chunk.
    core._neighbours = lambda items: cache[len(items.ids)] if len(items.ids) in cache else \
        cache.setdefault(len(items.ids), neighbours(items))

    class ScaledSimulator(FeedbackSimulator):
        def history(self, chunk_users: int):
            """Batch 0 users' histories, ``chunk_users`` users at a time (bounded memory)."""
            cfg, users = self.config, self._user_group(0)
            rng, window_end = np.random.default_rng([cfg.seed, 90, 0]), self._window(0)[1]
            lengths = 3 + rng.negative_binomial(2, 2 / (cfg.events_per_user - 1), size=len(users.index))  # as events(0)
            for start in range(0, len(users.index), chunk_users):
                rows = np.arange(start, min(start + chunk_users, len(users.index)))
                part = _take(users, rows)
                yield self._simulate(0, part, part.join_time, lengths[rows], window_end,
                                     np.random.default_rng([cfg.seed, 91, start]))

    config = SimulatorConfig(**world(spec["size"], spec.get("items")))
    simulator = ScaledSimulator(config)
    landing, staging = home / "var" / "landing", home / "staging"
    write_bytes_atomic(landing / "catalog" / "catalog-00000.jsonl", _to_jsonl(simulator.catalog()).encode())
    frames, files, events = [], 0, 0
    chunks = simulator.history(max(20, int(2e7 // config.n_items)))  # (chunk users x items) float64 <= 160 MB
    for frame in itertools.chain(chunks, [None]):  # None: write the rest
        frames += [] if frame is None else [frame]
        events += 0 if frame is None else len(frame)
        if frames and (frame is None or sum(map(len, frames)) >= FILE_EVENTS):
            frame = pd.concat(frames, ignore_index=True).sort_values("timestamp", kind="stable")
            write_bytes_atomic(landing / "events" / f"events-00000-part{files:04d}.jsonl", _to_jsonl(frame).encode())
            frames, files = [], files + 1
    for batch in range(1, spec["microbatches"] + 1):
        simulator.write_batch(staging, batch)
    out.update(events=events, files=files, **world(spec["size"], spec.get("items")))


def environment(home: Path, spec: dict):
    os.environ.update({"RECSYS_HOME": str(home), "RECSYS_SENSOR_INTERVAL_S": str(spec["sensor_interval"]),
                       "RECSYS_FULL_RETRAIN_CRON": "0 0 1 1 *"})  # no nightly retrain during the benchmark
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "RECSYS_LANDING_ZONE", "RECSYS_LAKE",
                 "RECSYS_MLFLOW_ARTIFACTS", "RECSYS_PSEUDONYM_KEY", "RECSYS_PSEUDONYM_KEY_FILE", "RECSYS_TEXT_MODEL"):
        os.environ.pop(name, None)
    if spec["tiny_text"]:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import make_tiny_encoder_dir
        tiny = home / "tiny-encoder"
        os.environ["RECSYS_TEXT_MODEL"] = str(tiny if tiny.exists() else make_tiny_encoder_dir(tiny))
    elif spec["text_model"]:
        os.environ["RECSYS_TEXT_MODEL"] = spec["text_model"]
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    from rec_pipelines.registry import ModelRegistry
    from rec_pipelines.settings import prepare_environment
    settings = prepare_environment()  # exported to the daemon and its runs too
    return settings, ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)


def step_seconds(instance, run_id: str) -> dict:
    return {s.step_key: round(s.end_time - s.start_time, 2) for s in instance.get_run_step_stats(run_id)
            if s.start_time and s.end_time}


def ingest(home: Path, spec: dict, stage, out: dict) -> None:
    settings, _ = environment(home, spec)
    from rec_pipelines.lake import FeedbackStore
    from rec_pipelines.lake.validation import GE_MAX_ROWS, run_expectations

    stage("ingest")
    store = FeedbackStore.from_settings(settings, settings.landing_zone)
    t0 = time.perf_counter()
    report, t1 = store.ingest("events"), time.perf_counter()
    accounts, t2 = store.validate_pending(), time.perf_counter()
    suite = run_expectations(store.read_validated([a["batch_id"] for a in accounts]), max_rows=GE_MAX_ROWS)
    t3 = time.perf_counter()
    out.update(ingest_rows=report.rows_in, ingest_rows_per_s=round(report.rows_in / (t2 - t0)),
               rows_valid=sum(a["rows_valid"] for a in accounts), ge_success=bool(suite.success))
    out["stage_s"] = {"ingest": {"ingest": round(t1 - t0, 2), "validate": round(t2 - t1, 2), "ge": round(t3 - t2, 2)}}


def train(home: Path, spec: dict, stage, out: dict) -> None:
    """The full retrain in its own process, as ``dagster job execute`` runs it (the job's
    in-process executor, outputs through the IO manager, as in a launched run's worker)."""
    settings, registry = environment(home, spec)
    import dagster as dg

    from rec_pipelines.registry import CHAMPION

    stage("full_retrain")
    config = {"mode": "full", "max_time_s": spec["cap_s"], "model": spec["model"],
              **({"max_epochs": spec["max_epochs"]} if spec["max_epochs"] else {})}
    run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}, "ops": {"candidate_model": {"config": config}}}
    (home / "full_retrain.yaml").write_text(json.dumps(run_config))  # JSON is YAML
    started = time.perf_counter()
    with open(home / "full_retrain.log", "w") as log:
        subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "rec_pipelines.definitions",
                        "-j", "full_retrain_job", "-c", str(home / "full_retrain.yaml")],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    out["full_retrain_s"] = round(time.perf_counter() - started, 1)
    with dg.DagsterInstance.get() as instance:
        record = instance.get_run_records(dg.RunsFilter(job_name="full_retrain_job"), limit=1)[0]
        out["stage_s"] = {"full_retrain": step_seconds(instance, record.dagster_run.run_id)}
        event = instance.get_latest_materialization_event(dg.AssetKey("candidate_model"))
        meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    out.update(full_retrain_windows_per_s=round(meta["sequences_per_s"], 1), full_retrain_stopped_by=meta["stopped_by"],
               full_retrain_train_s=round(meta["train_s"], 1), full_retrain_networks=meta.get("networks"),
               full_retrain_windows_per_epoch=meta.get("windows_per_epoch"),
               champion=registry.version_by_alias(CHAMPION).version)


def microbatches(home: Path, spec: dict, stage, out: dict) -> None:
    settings, registry = environment(home, spec)
    import dagster as dg

    from rec_pipelines.cli import stop_processes
    from rec_pipelines.registry import CHAMPION

    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "rec_pipelines.definitions"],
                              stdout=open(home / "daemon.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    out.update(microbatch_s_all=[], microbatch_outcomes=[], stage_s={"microbatch": []})
    staging, landing, model = home / "staging", Path(settings.landing_zone), settings.model_name
    try:
        with dg.DagsterInstance.get() as instance:
            deadline = time.monotonic() + 120
            while "SENSOR" not in instance.get_daemon_heartbeats() and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(spec["sensor_interval"] + 3)  # the sensor's first tick has seen an empty landing zone
            for batch in range(1, spec["microbatches"] + 1):
                stage(f"microbatch_{batch}")
                versions = {v.version for v in registry.client.search_model_versions(f"name = '{model}'")}
                dropped, dropped_at = time.perf_counter(), time.time()
                for kind in ("catalog", "events"):  # catalog first, as the simulator writes them
                    (landing / kind).mkdir(parents=True, exist_ok=True)
                    for path in sorted((staging / kind).glob(f"{kind}-{batch:05d}.jsonl")):
                        os.replace(path, landing / kind / path.name)
                outcome, reason = "timeout", ""
                while time.perf_counter() - dropped < spec["microbatch_timeout_s"]:
                    # The gate tags its decision, then moves the alias: wait for both (as freshness.py).
                    new = [v for v in registry.client.search_model_versions(f"name = '{model}'")
                           if v.version not in versions and "promotion.decision" in v.tags]
                    if new and (new[0].tags["promotion.decision"] == "rejected"
                                or registry.version_by_alias(CHAMPION).version == new[0].version):
                        outcome, reason = new[0].tags["promotion.decision"], new[0].tags.get("promotion.reason", "")
                        break
                    time.sleep(0.5)
                elapsed = time.perf_counter() - dropped
                out["microbatch_outcomes"].append(outcome)
                print(f"micro-batch {batch}: {outcome} after {elapsed:.1f}s ({reason[:150]})", flush=True)
                if outcome == "timeout":
                    out["status"] = f"microbatch: undecided {elapsed:.0f}s after drop {batch} (timeout)"
                    break
                out["microbatch_s_all"].append(round(elapsed, 1))
                record = None
                while time.perf_counter() - dropped < spec["microbatch_timeout_s"] and not (record and record.end_time):
                    time.sleep(0.5)  # wait for the run's end: a running retrain holds the sensor back
                    record = (instance.get_run_records(dg.RunsFilter(job_name="microbatch_retrain_job"), limit=1) or [None])[0]
                if record is not None and record.start_time and record.end_time:
                    out["stage_s"]["microbatch"].append({
                        "run_created_after_drop": round(record.create_timestamp.timestamp() - dropped_at, 2),
                        "run_started_after_drop": round(record.start_time - dropped_at, 2),
                        "run_s": round(record.end_time - record.start_time, 2),
                        "steps": step_seconds(instance, record.dagster_run.run_id)})
                time.sleep(1)
    finally:
        stop_processes((daemon,), grace_s=20)


PHASES = {"generate": generate, "ingest": ingest, "train": train, "microbatch": microbatches}
DRIVES_ONLY = {"train", "microbatch"}  # their worker only starts and watches the pipeline's processes


def worker(phase: str, home: Path) -> int:
    spec = json.loads((home / "spec.json").read_text())
    progress, out = home / f"progress-{phase}.jsonl", {}

    def stage(name: str) -> None:
        """Announce a stage (the supervisor times it) and save what is measured so far."""
        (home / f"result-{phase}.json").write_text(json.dumps(out))
        with open(progress, "a") as handle:
            handle.write(json.dumps({"stage": name, "t": time.time()}) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)

    stage(phase)
    try:
        PHASES[phase](home, spec, stage, out)
    finally:
        (home / f"result-{phase}.json").write_text(json.dumps(out))
    return 0


def copy_generated(source: Path, target: Path) -> None:
    """The generated landing zone, staged micro-batches and generation record, hard-linked where
    possible (the pipeline reads landing files, never writes them)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    for name in ("var/landing", "staging"):
        shutil.copytree(source / name, target / name, copy_function=link, dirs_exist_ok=True)
    shutil.copy2(source / "result-generate.json", target / "result-generate.json")


def run_size(label: str, args: argparse.Namespace) -> dict:
    size, home = parse_size(label), Path(tempfile.mkdtemp(prefix=f"recsys-scaling-{label}-"))
    timeouts = {"generate": args.gen_timeout_s, "ingest": args.stage_timeout_s, "train": args.stage_timeout_s,
                "microbatch": args.microbatch_timeout_s}
    (home / "spec.json").write_text(json.dumps({**vars(args), "size": size, "model": json.loads(args.model)}, default=str))
    print(f"== {label}: {world(size, args.items)} in {home}", flush=True)
    row: dict = {"size": label, "stage_s": {}, "peak_rss_mb_by_stage": {}, "status": "ok", "peak_rss_mb": 0, "peak_pss_mb": 0}
    cache = args.data / f"{label}-{args.microbatches}mb{f'-{args.items}items' if args.items else ''}" if args.data else None
    for phase in ["generate"] if args.generate_only else PHASES:
        started = time.perf_counter()
        if phase == "generate" and cache and (cache / "result-generate.json").exists():
            copy_generated(cache, home)
            status, rss, pss = "ok", {}, {}
        else:
            status, rss, pss = supervise(phase, home, args.max_rss_gb, timeouts[phase])
            if phase == "generate" and cache and status == "ok":
                shutil.rmtree(cache, ignore_errors=True)
                copy_generated(home, cache)
        row["harness_peak_rss_mb"] = max(row.get("harness_peak_rss_mb", 0), rss.pop("harness", 0))
        result_file = home / f"result-{phase}.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        row["stage_s"].update(result.pop("stage_s", {}))
        row.update(result)
        if phase == "generate":
            row.update(generate_s=round(time.perf_counter() - started, 1), generate_peak_rss_mb=max(rss.values(), default=0),
                       generated_before=not rss)
            print(f"generated {row.get('events', 0):,} events in {row.get('files', 0)} files, {row['generate_s']}s", flush=True)
        else:
            row["peak_rss_mb_by_stage"].update(rss)
            row["peak_rss_mb"], row["peak_pss_mb"] = max([row["peak_rss_mb"], *rss.values()]), max([row["peak_pss_mb"], *pss.values()])
        if status != "ok":
            row["status"] = f"{phase}: {status}"
            break
    decided = row.get("microbatch_s_all") or []
    row["microbatch_s"] = round(statistics.median(decided), 1) if decided else None
    print(f"{label}: {row['status'][:80]}; ingest {row.get('ingest_rows_per_s')} rows/s; full retrain "
          f"{row.get('full_retrain_windows_per_s')} windows/s ({row.get('full_retrain_s')}s, {row.get('full_retrain_stopped_by')}); "
          f"micro-batch {row['microbatch_s']}s {decided}; peak RSS {row['peak_rss_mb']} MB (PSS {row['peak_pss_mb']} MB)", flush=True)
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100k,1m,10m", help="history sizes in events (k/m suffixes)")
    parser.add_argument("--cap-s", type=float, default=300, help="full retrain: max_time_s of each SASRec network")
    parser.add_argument("--max-epochs", type=int, default=0, help="full retrain: max_epochs (0: the model's default)")
    parser.add_argument("--items", type=int, help="a catalog of this many items at every size (default: 3k growing "
                        "to 100k at 10M): tells history growth from catalog growth")
    parser.add_argument("--microbatches", type=int, default=2, help="drops per size (the median is reported)")
    parser.add_argument("--stage-timeout-s", type=float, default=900, help="ingest, full retrain: per stage and size")
    parser.add_argument("--microbatch-timeout-s", type=float, help="one drop's limit (default: --stage-timeout-s)")
    parser.add_argument("--gen-timeout-s", type=float, default=3600, help="generation of one size")
    parser.add_argument("--model", default="{}", help="JSON RecommenderConfig overrides (micro-batches inherit them)")
    parser.add_argument("--text-model", default="", help="encoder folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--tiny-text", action="store_true", help="a tiny random encoder (tests/helpers.py)")
    parser.add_argument("--sensor-interval", type=int, default=5, help="seconds between sensor ticks")
    parser.add_argument("--max-rss-gb", type=float, help="stop a size whose PSS exceeds this (default: 70%% of RAM, <= 16)")
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    parser.add_argument("--keep", action="store_true", help="keep each size's temp home")
    parser.add_argument("--data", type=Path, help="keep generated histories here and reuse them")
    parser.add_argument("--generate-only", action="store_true", help="generate (into --data) and stop")
    parser.add_argument("--worker", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.home)
    args.microbatch_timeout_s = args.microbatch_timeout_s or args.stage_timeout_s
    if args.generate_only and not args.data:
        parser.error("--generate-only needs --data DIR")
    if args.max_rss_gb is None:
        args.max_rss_gb = round(min(16.0, 0.7 * int(read_proc("/proc/meminfo", "MemTotal:")) / 2**20), 1)
    with contextlib.suppress(OSError, AttributeError):  # orphans of a killed worker stay ours: measured, stopped
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    rows = [run_size(label.strip(), args) for label in args.sizes.split(",") if label.strip()]
    names = dict.fromkeys(name for r in rows for name in r if name != "size")  # every field, in order
    result = {"sizes": [r["size"] for r in rows], **{name: [r.get(name) for r in rows] for name in names},
              "cap_s": args.cap_s, "max_epochs": args.max_epochs or None, "model_overrides": json.loads(args.model),
              "text_model": "tiny random encoder" if args.tiny_text else (args.text_model or "all-MiniLM-L6-v2 (default)"),
              "sensor_interval_s": args.sensor_interval, "fixed_items": args.items, "cpus": os.cpu_count(),
              "microbatch_events": BATCH["batch_users"] * BATCH["batch_events_per_user"]}
    by_size = {parse_size(r["size"]): r for r in rows}
    small, large = by_size.get(100_000, {}), by_size.get(10_000_000, {})
    if small.get("microbatch_s") and large.get("microbatch_s"):  # the targets, as measured
        ratio = large["microbatch_s"] / small["microbatch_s"]
        result["targets"] = {"microbatch_10m_over_100k": round(ratio, 2), "ratio_at_most_1.5": ratio <= 1.5,
                             "microbatch_10m_at_most_60s": large["microbatch_s"] <= 60}
    if large.get("peak_rss_mb"):
        result.setdefault("targets", {}).update(peak_rss_10m_at_most_6gb=large["peak_rss_mb"] <= 6 * 1024,
                                                peak_pss_10m_at_most_6gb=large["peak_pss_mb"] <= 6 * 1024)
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
