"""Project layout promises: rec_models stays importable without Dagster."""

import subprocess
import sys


def test_rec_models_never_imports_dagster():
    code = (
        "import sys, pkgutil, importlib, rec_models\n"
        "for m in pkgutil.iter_modules(rec_models.__path__): importlib.import_module('rec_models.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'dagster' or n.startswith('dagster.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
