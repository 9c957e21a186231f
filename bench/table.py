"""The headline figures of ``outputs/bench/bench.json`` as one Markdown table, with their goals.

Run last by ``make bench``; prints the table and writes ``outputs/bench/table.md``. Each row
gives the figure, what it replaces (measured in the same run where the bench measures both),
the goal and whether it is met. A bench that has not run shows as "not measured".
"""

import json
import os
import sys

from common import BENCH_JSON

TABLE_MD = BENCH_JSON.parent / "table.md"
STAGES = (
    "model",
    "atlas",
    "load",
    "extraction",
    "n4",
    "registration",
    "standardisation",
    "network",
    "post_processing",
    "writing",
)


def _get(entry: dict | None, *keys, default=None):
    """``entry[k1][k2]…``, or ``default`` when any level is missing."""
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return default
        entry = entry[key]
    return entry


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float) and (abs(value) < 1e-3 and value != 0):
        return f"{value:.1e}{unit}"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _verdict(value, ok) -> str:
    if value is None:
        return "—"
    return "**met**" if ok(value) else "**missed**"


def rows(entries: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, measured, what it replaces, goal, met) for each headline figure."""
    out = []
    dense = entries.get("dense_vs_patch_inference")
    ratio = _get(dense, "ratio_patch_over_dense")
    out.append(
        (
            "dense vs patch inference, one 1 mm ROI",
            _fmt(ratio, "× faster") + f" (dense {_fmt(_get(dense, 'seconds_dense'), ' s')})",
            f"patches {_fmt(_get(dense, 'seconds_patch'), ' s')}",
            "≥ 50×",
            _verdict(ratio, lambda v: v >= 50),
        )
    )
    diff = _get(dense, "max_abs_probability_difference")
    out.append(
        (
            "dense vs patch, largest probability difference",
            _fmt(diff),
            "patch probabilities (reference)",
            "< 1e-4",
            _verdict(diff, lambda v: v < 1e-4),
        )
    )
    tune = entries.get("finetune_epoch_cached_vs_patches")
    ratio = _get(tune, "ratio_epoch_patches_over_cached")
    out.append(
        (
            "fine-tuning epoch, cached vs uncached features (TL-1)",
            _fmt(ratio, "× faster"),
            f"patches through the frozen convs {_fmt(_get(tune, 'seconds_epoch_patches'), ' s')}",
            "≥ 10×",
            _verdict(ratio, lambda v: v >= 10),
        )
    )
    cached = _get(tune, "seconds_epoch_cached")
    before = _get(tune, "seconds_epoch_cached_before")
    apart = _get(tune, "train_loss_difference_cached_vs_before")
    seeds = _get(tune, "train_loss_difference_seed_2_vs_seed_1")
    out.append(
        (
            "fine-tuning epoch, cached",
            _fmt(cached, " s", 2),
            f"the cached code before issue #12 {_fmt(before, ' s', 2)} (the same loss curve: "
            f"mean training loss {_fmt(apart, '', 4)} apart, two seeds {_fmt(seeds, '', 4)}); "
            "paper: 8 s on a TITAN X GPU",
            "< 8 s",
            _verdict(cached, lambda v: v < 8),
        )
    )
    predict = entries.get("predict_one_scan_by_stage")
    for kind in ("raw", "stripped"):
        scan = _get(predict, kind, default={})
        stages = _get(scan, "seconds_by_stage", default={})
        if stages:
            shown = [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]
            by_stage = ", ".join(f"{s} {stages[s]:.1f}" for s in shown)
            rest = _get(scan, "seconds_startup_and_rest")
            if rest is not None:
                by_stage += f"; start-up and the rest {rest:.1f}"
            out.append((f"predict.py, one 1 mm {kind} scan: stages (s)", by_stage, "—", "—", "—"))
        whole = _get(scan, "seconds_whole_command")
        out.append(
            (
                f"predict.py, one 1 mm {kind} scan, whole command (caches cold)",
                _fmt(whole, " s"),
                "the stages one by one here " + _fmt(_get(scan, "seconds_stages_sum"), " s"),
                "< 30 s",
                _verdict(whole, lambda v: v < 30),
            )
        )
    source = entries.get("source_training")
    rate = _get(source, "samples_per_second")
    out.append(
        (
            "source training throughput",
            _fmt(rate, " samples/s"),
            "none before",
            "reported",
            "—",
        )
    )
    to_target = _get(source, "seconds_to_target")
    target = _get(source, "target_val_dice_mean", default=0.8)
    reached = _get(source, "reached_target")
    if reached:
        measured = (
            f"{_fmt(to_target, ' s')} ({_get(source, 'epochs_to_target')} epochs; training loop "
            f"alone {_fmt(_get(source, 'seconds_to_target_training_only'), ' s')})"
        )
    else:
        measured = "not reached in the epochs run" if source else "not measured"
    out.append(
        (
            f"source training, time to whole-volume val Dice {target:.2f}",
            measured,
            "none before",
            "reported",
            "—" if reached or not source else "**missed**",
        )
    )
    memory = entries.get("peak_memory")
    small = _get(predict, "peak_rss_mb_whole_command")
    for key, label, goal_mb, before in (
        ("train_15_subjects", "peak memory, training on 15 source subjects", 8192, "none before"),
        (
            "predict_256_cubed",
            "peak memory, predicting a 256³ scan",
            4096,
            "none before; the 1 mm scan above (168×204×178) "
            + _fmt(None if small is None else small / 1024, " GiB", 2),
        ),
    ):
        # The sampled sum of the process tree can miss a short peak that ru_maxrss catches.
        tree = _get(memory, key, "peak_tree_rss_mb")
        largest = _get(memory, key, "peak_rss_mb")
        peak = None if tree is None else max(tree, largest or 0)
        out.append(
            (
                label,
                _fmt(None if peak is None else peak / 1024, " GiB", 2)
                + (f" ({_get(memory, key, 'seconds', default='?')} s run)" if memory else ""),
                before,
                f"< {goal_mb // 1024} GiB",
                _verdict(peak, lambda v, g=goal_mb: v < g),
            )
        )
    for key, label, reference in (
        ("n4_bias_correction", "N4 per scan, shrink 4 (optional bench)", "full resolution"),
        ("atlas_registration", "atlas registration per scan, default (optional bench)", "at 1 mm"),
    ):
        entry = entries.get(key)
        if entry:
            default, full = _get(entry, "seconds_default"), _get(entry, "seconds_full")
            out.append((label, _fmt(default, " s"), f"{reference} {_fmt(full, ' s')}", "—", "—"))
    return out


def main() -> None:
    if not BENCH_JSON.is_file():
        raise SystemExit(f"{BENCH_JSON}: no benchmark results yet (run make bench)")
    entries = json.loads(BENCH_JSON.read_text())
    machine = next((e.get("machine") for e in entries.values() if isinstance(e, dict)), "?")
    lines = [
        f"Benchmarks ({BENCH_JSON}; {machine}; load average now {os.getloadavg()[0]:.1f})",
        "",
        "| figure | measured | what it replaces | goal | |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows(entries)),
    ]
    text = "\n".join(lines) + "\n"
    TABLE_MD.parent.mkdir(parents=True, exist_ok=True)
    TABLE_MD.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
