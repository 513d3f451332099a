"""``recsys``: the command line of the feedback loop.

    recsys demo       run the whole loop on the embedded simulator (README's main command)
    recsys simulate   drop the simulator's next feedback batch into the landing zone
    recsys ui         start the Dagster UI + daemon and the MLflow UI on 127.0.0.1
    recsys ingest     ingest feedback files through the pipeline's own code path
    recsys rollback   restore the previous champion
    recsys serve      serve models:/<name>@champion over HTTP (MLflow scoring server)
    recsys evaluate   compare every model on a MovieLens-layout folder (offline protocol)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rec_pipelines.settings import artifact_root_uri, prepare_environment


def cmd_demo(args: argparse.Namespace) -> int:
    from rec_pipelines.cli.demo import run_demo

    settings = prepare_environment()
    settings.local_landing_zone("demo")
    return run_demo(settings, full=args.full, n_users=args.users)


def stop_processes(processes, grace_s: float = 10.0) -> None:
    """SIGTERM each process group (started with ``start_new_session=True``), then SIGKILL what is
    still running after ``grace_s`` seconds in all."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def cmd_ui(args: argparse.Namespace) -> int:
    settings = prepare_environment()
    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    mlflow_db = settings.mlflow_tracking_uri
    commands = {
        "dagster-webserver": [str(bin_dir / "dagster-webserver"), "-m", "rec_pipelines.definitions",
                              "-h", args.host, "-p", str(args.port)],
        "dagster-daemon": [str(bin_dir / "dagster-daemon"), "run", "-m", "rec_pipelines.definitions"],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--backend-store-uri", mlflow_db,
                   "--default-artifact-root", artifact_root_uri(settings.mlflow_artifact_root) or "./mlartifacts",
                   "--host", args.host, "--port", str(args.mlflow_port)],
    }
    processes = {name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in commands.items()}
    print(f"Dagster UI: http://{args.host}:{args.port}   MLflow UI: http://{args.host}:{args.mlflow_port}")
    print("Ctrl-C stops all three.")

    def stop(*_):
        stop_processes(processes.values())

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        while all(p.poll() is None for p in processes.values()):
            time.sleep(1)
        failed = [name for name, p in processes.items() if p.poll() is not None]
        print(f"stopped: {failed} exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


# Commands whose arguments their own module parses: name -> (module, help).
DELEGATED = {
    "ingest": ("rec_pipelines.cli.ingest", "ingest feedback files through the pipeline's own code path"),
    "rollback": ("rec_pipelines.cli.rollback", "restore the previous champion"),
    "simulate": ("rec_pipelines.cli.simulate", "drop the next simulated batch, or (--online) play simulated users "
                 "against a running server"),
    "quarantine": ("rec_pipelines.cli.quarantine", "what was quarantined, by reason; --csv FILE exports the rows"),
    "serve": ("rec_pipelines.cli.serve", "serve models:/<name>@champion over HTTP"),
    "evaluate": ("rec_models.evaluation.offline", "compare every model on a MovieLens-layout folder"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        prepare_environment()
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the whole feedback loop on the embedded simulator")
    demo.add_argument("--full", action="store_true", help="full retrain first even if a champion exists")
    demo.add_argument("--users", type=int, default=3, help="users to print recommendations for")
    demo.set_defaults(func=cmd_demo)

    ui = commands.add_parser("ui", help="start Dagster (webserver + daemon) and MLflow UIs")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
