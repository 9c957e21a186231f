"""Every module of subseg imports on its own in a fresh interpreter: no import cycles."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from conftest import REPO

MODULES = sorted(p.stem for p in (REPO / "subseg").glob("*.py") if p.stem != "__init__")


def _import_alone(module: str) -> tuple[str, int, str]:
    result = subprocess.run(
        [sys.executable, "-c", f"import subseg.{module}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return module, result.returncode, result.stderr[-2000:]


def test_each_module_imports_on_its_own():
    assert len(MODULES) > 20 and "tasks" not in MODULES  # the 1,000-line tasks.py is gone
    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [r for r in pool.map(_import_alone, MODULES) if r[1] != 0]
    assert not failed, "\n".join(f"subseg.{m}: {err}" for m, _, err in failed)


def test_the_model_needs_neither_lightning_nor_hydra():
    code = (
        "import sys, subseg.model.network, subseg.model.dense; "
        "print(any(m.split('.')[0] in ('lightning', 'hydra') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
