"""Every module of subseg imports on its own in a fresh interpreter.

A module that works only when something else was imported first fails here. Import cycles, which
importing one module at a time cannot show when a function-level import closes them, are checked
from the source in test_layering.py.
"""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from conftest import REPO

MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for p in (REPO / "subseg").rglob("*.py")
)


def _import_alone(module: str) -> tuple[str, int, str]:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,  # this checkout's subseg, whichever one is installed
    )
    return module, result.returncode, result.stderr[-2000:]


def test_each_module_imports_on_its_own():
    assert len(MODULES) > 20 and "subseg.tasks.train" in MODULES
    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [r for r in pool.map(_import_alone, MODULES) if r[1] != 0]
    assert not failed, "\n".join(f"{m}: {err}" for m, _, err in failed)


def test_the_model_needs_neither_lightning_nor_hydra():
    code = (
        "import sys, subseg.model.network, subseg.model.dense; "
        "print(any(m.split('.')[0] in ('lightning', 'hydra') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr
