"""The package stands alone: its configs ship inside it, and its commands are console scripts."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

from subseg import CONF_DIR

COMMANDS = ("train", "finetune", "evaluate", "predict", "suggest", "demo")


def test_the_configs_live_in_the_package_and_the_repository_links_to_them():
    assert CONF_DIR == REPO / "subseg" / "conf"
    assert all((CONF_DIR / f"{name}.yaml").is_file() for name in COMMANDS)
    assert (REPO / "conf").resolve() == CONF_DIR  # conf/… paths in the docs stay true


def test_a_built_wheel_carries_every_config(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "subseg", source / "subseg", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("subseg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        scripts = archive.read(
            next(n for n in shipped if n.endswith(".dist-info/entry_points.txt"))
        ).decode()
    configs = {p.relative_to(REPO).as_posix() for p in CONF_DIR.rglob("*.yaml")}
    assert configs and configs <= shipped, sorted(configs - shipped)[:5]
    assert "subseg/core/label_tables.yaml" in shipped
    for name in COMMANDS:
        assert f"subseg-{name} = subseg.tasks.commands:{name}" in scripts


def test_a_console_script_runs_its_command_from_any_folder(tmp_path):
    script = Path(sys.executable).parent / "subseg-predict"
    assert script.is_file(), "the package is not installed with its console scripts (make install)"
    result = subprocess.run(
        [str(script), f"ckpt={tmp_path / 'missing.ckpt'}", "input=x", f"out_dir={tmp_path / 'o'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"subseg: error: {tmp_path / 'missing.ckpt'}: no such checkpoint"
