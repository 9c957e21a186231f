"""What software and machine made a run: recorded in every run folder, shown in the report.

A number without the versions that produced it cannot be reproduced or compared: the report of a
sweep that ran across two installs should say so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "monai", "lightning", "antspyx", "nibabel", "numpy", "scipy", "hydra-core")
"""The packages whose versions change results."""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(folder: str | Path | None = None) -> str:
    """The code's git commit (``+dirty`` with uncommitted changes), or ``not a git checkout``."""
    folder = Path(folder) if folder else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return (
        out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "not a git checkout"
    )


def record(accelerator: str | None = None) -> dict:
    """The environment of this process: Python, package versions, commit, device, threads.

    Args:
        accelerator: the accelerator the run asked for (``cpu``, ``gpu``, ``auto``).
    """
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "subseg": _version("subseg"),
        "git_commit": git_commit(),
        "platform": f"{platform.system()} {platform.machine()}",
        "accelerator": accelerator,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "argv": list(sys.argv),
    }


def describe(env: dict) -> str:
    """One line for the report: ``torch 2.13.0, monai 1.6.1, … ; commit abc; cpu, 2 threads``."""
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    return (
        f"Python {env.get('python')}; {packages}; subseg {env.get('subseg')} at "
        f"{env.get('git_commit')}; {env.get('device')}, {env.get('torch_threads')} torch threads "
        f"on {env.get('cores')} cores"
    )
