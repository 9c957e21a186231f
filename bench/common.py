"""Shared by the benchmarks: where results go and how an entry is recorded."""

import json
import os
import platform
from pathlib import Path

from subseg.core import io

BENCH_JSON = Path(os.environ.get("SUBSEG_BENCH_JSON", "outputs/bench/bench.json"))


def record(name: str, entry: dict) -> dict:
    """Add or replace one named entry of ``outputs/bench/bench.json`` (written atomically)."""
    entries = json.loads(BENCH_JSON.read_text()) if BENCH_JSON.is_file() else {}
    entries[name] = {**entry, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    BENCH_JSON.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(BENCH_JSON) as tmp:
        tmp.write_text(json.dumps(entries, indent=2))
    print(json.dumps({name: entries[name]}, indent=2))
    return entries[name]
