"""Process-tree helpers of the benchmarks: a process's descendants, their memory, stopping them."""

from __future__ import annotations

import contextlib
import os
import signal
import time


def read_proc(path: str, key: str = "") -> str:
    """A /proc file (the value on its line starting with ``key`` if given); "" when gone."""
    try:
        with open(path) as handle:
            return next((line.split()[1] for line in handle if line.startswith(key)), "") if key else handle.read()
    except (OSError, IndexError):
        return ""


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        stat = read_proc(f"/proc/{name}/stat").rsplit(")", 1)
        if len(stat) == 2:
            children.setdefault(int(stat[1].split()[1]), []).append(int(name))
    found = [root]
    for pid in found:
        found.extend(children.get(pid, []))
    return found


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB; PSS shares each shared page among its users."""
    return (int(read_proc(f"/proc/{pid}/status", "VmRSS:") or 0) / 1024,
            int(read_proc(f"/proc/{pid}/smaps_rollup", "Pss:") or 0) / 1024)


def kill_descendants(grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, every process this one started (directly or not); reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree(os.getpid())[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while len(tree(os.getpid())) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
