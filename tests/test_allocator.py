"""``keep_freed_memory``: freed blocks up to 32 MiB stay in the process (no page faults on the
next batch's tensors), unless the operator set glibc's own variables."""

import os
import subprocess
import sys

import pytest

from rec_models.allocator import OPERATOR_VARIABLES

# Frees a 24 MiB array and prints whether the allocator was tuned and by how many MiB RSS fell.
SCRIPT = """
import sys, numpy as np
from rec_models.allocator import keep_freed_memory
def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
changed = keep_freed_memory() if sys.argv[1] == "tuned" else False
block = np.ones(24 << 20, dtype=np.uint8)
before = rss()
del block
print(changed, (before - rss()) >> 20)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc on Linux")


def run(mode: str, **extra_env) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in OPERATOR_VARIABLES} | extra_env
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    changed, released = out.stdout.split()
    return changed, int(released)


def test_freed_block_stays_in_the_process():
    assert run("default") == ("False", 24)  # glibc's default: the block goes back to the OS
    assert run("tuned") == ("True", 0)


def test_the_operators_own_setting_wins():
    assert run("tuned", MALLOC_TRIM_THRESHOLD_="1") == ("False", 24)
