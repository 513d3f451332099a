"""Project layout promises: rec_models stays importable without Dagster; the README names\nevery package."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rec_models_never_imports_dagster():
    code = (
        "import sys, pkgutil, importlib, rec_models\n"
        "for m in pkgutil.walk_packages(rec_models.__path__, 'rec_models.'):\n"
        "    if not m.name.endswith('pyfunc_model'): importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'dagster' or n.startswith('dagster.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_layout_lists_every_package():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Configuration")]
    packages = sorted(p.parent.relative_to(REPO).as_posix() for root in ("rec_models", "rec_pipelines")
                      for p in (REPO / root).rglob("*/__init__.py"))
    missing = [p for p in packages if f"`{p}/`" not in layout and f"`{p.rsplit('/', 1)[-1]}/`" not in layout]
    assert missing == []
