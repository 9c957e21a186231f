"""Gather the run folders of a transfer-learning protocol into the paper's tables and figures.

Every complete fine-tuning run folder (one with ``complete.json``) describes itself
(``summary.json`` with its method key, ``metrics.csv``, ``.hydra/config.yaml`` with its draw,
``source_test/`` when evaluated back on the source cohort). This module reads a set of them,
whatever launched them (a Hydra multirun, the demo, a SLURM sweep), and writes:

- ``report.md`` and ``report.csv``: structures × methods, mean ± std Dice, Avg, wAvg, and the
  paired Wilcoxon p-value of each method against a baseline (Holm-corrected across the table);
  a source-domain retention table when the runs were evaluated back on the source cohort;
- ``summary.json``: ``{"methods": {key: {"avg", "wavg", "per_structure", …}}}``;
- ``learning_curve.png``: Avg Dice against k, one line per method family (the paper's Fig. 4);
- ``structures_vs_k.png``: per-structure Dice against k for TL (the paper's Fig. 3);
- ``quality_vs_dice.png``: the label-free quality score against true Dice (No TL and TL-1), with
  its Spearman correlation in ``summary.json``'s ``quality``.

``python -m subseg.report.report <folders or sweep roots> --out DIR [--baseline no_tl]``.
No Lightning or Hydra imports: usable from a notebook.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from subseg.core import cache, environment, io
from subseg.core.figures import save_figure
from subseg.core.labels import STRUCTURES
from subseg.evaluation import metrics, quality, stats
from subseg.runs.method_keys import FAMILIES, family_of, sort_key
from subseg.runs.run_folder import RunFolder


@dataclass
class Run:
    """One run folder's results."""

    folder: Path
    method: str
    n_images: int
    draw: int | str  # the draw number, or the scans a run named (target.ids): what it trained on
    rows: list[dict]
    source_rows: list[dict] = field(default_factory=list)
    environment: dict | None = None


def read_metrics(path: Path) -> list[dict]:
    """A run's ``metrics.csv`` rows, numbers as floats (NaN where empty or absent)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        # Runs from before the quality score lack its columns.
        for key in (*metrics.COLUMNS[2:], *quality.COLUMNS):
            value = row.get(key)
            row[key] = float(value) if value not in ("", None) else float("nan")
    return rows


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every complete fine-tuning run folder at or below ``paths``.

    A run folder without its completion marker (killed, failed or still running) is skipped
    with a note on stderr: its files cannot be trusted.
    """
    runs, skipped = [], []
    for root in map(Path, paths):
        found = {p.parent for p in root.rglob(RunFolder.MARKER)}
        found |= {
            p.parent.parent for p in root.rglob("config.yaml") if RunFolder.of(p.parent.parent)
        }
        for folder in sorted(found):
            run = RunFolder(folder)
            if folder == RunFolder(folder.parent).source_test.path:  # part of its parent run
                continue
            if not run.is_complete():
                skipped.append(folder)
                continue
            summary = run.read_json(run.summary_file)
            if "method" not in summary:  # a training or evaluation run
                continue
            if summary.get("held_out") == 0:  # trained on every labelled scan: nothing tested
                print(f"subseg: skipped {folder}: it holds no held-out scan", file=sys.stderr)
                continue
            config = run.config() if run.config_file.is_file() else {}
            target = config.get("target") or {}
            if target.get("fold_of"):  # a leave-one-out fold of a run with no held-out scan
                continue
            source_metrics = run.source_test.metrics_file
            if summary["method"] == "no_tl" and not source_metrics.is_file():
                source_metrics = _source_model_metrics(run)  # No TL is the source model
            runs.append(
                Run(
                    folder=folder,
                    method=summary["method"],
                    n_images=int(summary.get("n_images", target.get("n_images", 0))),
                    draw=(
                        "+".join(sorted(map(str, target["ids"])))
                        if target.get("ids")
                        else int(target.get("draw", 0))
                    ),
                    rows=read_metrics(run.metrics_file),
                    source_rows=read_metrics(source_metrics) if source_metrics.is_file() else [],
                    environment=run.environment(),
                )
            )
    for folder in skipped:
        print(
            f"subseg: skipped {folder}: not a complete run (no {RunFolder.MARKER}: killed, "
            "failed or still running)",
            file=sys.stderr,
        )
    if not runs:
        raise io.InputError(
            f"{', '.join(map(str, paths))}: no complete fine-tuning run folders "
            f"(with {RunFolder.MARKER})"
        )
    return runs


def _source_model_metrics(run: RunFolder) -> Path:
    """The test metrics of the complete source run a fine-tuning run started from."""
    transfer = run.read_json(run.transfer_file)
    init = transfer.get("init", "")
    source = RunFolder.of(init) if init and init != "scratch" else None
    if (
        source is not None
        and source.is_complete()
        and source.checkpoint.is_file()
        # the same model No TL evaluated, not one trained again since in the same folder
        and cache.file_digest(source.checkpoint) == transfer.get("source_sha256")
    ):
        return source.metrics_file
    return run.source_test.metrics_file  # absent: no retention row


def _grouped(runs: Sequence[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    tested: dict[tuple, Path] = {}
    for run in runs:
        grouped.setdefault(run.method, []).append(run)
        for subject in {r["subject"] for r in run.rows}:
            key = (run.method, run.draw, subject)
            if key in tested:  # counted twice, it would weigh twice in the table and the test
                raise io.InputError(
                    f"{run.folder} and {tested[key]}: both test {subject} with {run.method}, "
                    f"draw {run.draw}; report one of them"
                )
            tested[key] = run.folder
    return {m: grouped[m] for m in sorted(grouped, key=sort_key)}


def _pooled(runs: Sequence[Run], source: bool = False) -> list[dict]:
    """Rows of every run of a method, each subject tagged with its draw."""
    out = []
    for run in runs:
        for row in run.source_rows if source else run.rows:
            out.append({**row, "subject": f"{row['subject']}@{run.draw}", "draw": run.draw})
    return out


def _per_subject(runs: Sequence[Run]) -> dict[tuple[str, str], float]:
    """(subject, structure) → Dice, averaged over the draws that tested the subject."""
    values: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        for key, dice in stats.dice_by_pair(run.rows).items():
            values.setdefault(key, []).append(dice)
    return {key: float(np.mean(v)) for key, v in values.items()}


def _pairs(runs: Sequence[Run], baseline: Sequence[Run]) -> tuple[np.ndarray, np.ndarray]:
    """Paired Dice (method, baseline) on the subject × structure pairs both tested.

    Each side's Dice is first averaged over its draws, so every pair is one subject's structure
    (independent pairs, as the Wilcoxon test assumes) whether a method has one draw (No TL, the
    same model for every draw) or several.
    """
    return stats.paired(_per_subject(runs), _per_subject(baseline))


def summarize_methods(runs: Sequence[Run], baseline: str = "no_tl") -> dict:
    """Per method: Avg, wAvg, per-structure mean/std, number of runs and subjects, p-values.

    Returns:
        ``{"baseline": …, "methods": {key: {...}}}`` as written to ``summary.json``.
    """
    grouped = _grouped(runs)
    out = {}
    for method, method_runs in grouped.items():
        summary = metrics.summarize(_pooled(method_runs))
        summary.update(
            n_runs=len(method_runs),
            draws=sorted({r.draw for r in method_runs}, key=str),
            n_images=method_runs[0].n_images,
            avg_per_draw=[metrics.summarize(r.rows)["avg"] for r in method_runs],
        )
        if all(r.source_rows for r in method_runs):
            source = metrics.summarize(_pooled(method_runs, source=True))
            summary["source_test"] = {"avg": source["avg"], "wavg": source["wavg"]}
        out[method] = summary
    if baseline in grouped:
        compared = [m for m in grouped if m != baseline]
        raw = [stats.wilcoxon(*_pairs(grouped[m], grouped[baseline])) for m in compared]
        for method, p, p_holm in zip(compared, raw, stats.holm(raw), strict=True):
            out[method]["p_vs_baseline"] = p
            out[method]["p_vs_baseline_holm"] = float(p_holm)
    return {"baseline": baseline, "methods": out}


def _cell(stat: dict, n_subjects: int) -> str:
    """``mean ± std``, with ``(n of N)`` when some references lack the structure."""
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    n = stat.get("n", n_subjects)
    return text if n == n_subjects else f"{text} ({n} of {n_subjects})"


def table_rows(summary: dict) -> list[dict]:
    """The paper's layout: one row per structure, then Avg, wAvg and p; a column per method.

    A structure cell says how many subject×draw it averages when that is fewer than the
    method's (a reference label without the structure).
    """
    methods = summary["methods"]
    rows = [
        {
            "structure": name,
            **{m: _cell(s["per_structure"][name], s["n_subjects"]) for m, s in methods.items()},
        }
        for name in STRUCTURES
    ]
    rows.append({"structure": "Avg", **{m: f"{s['avg']:.3f}" for m, s in methods.items()}})
    if any(len(s["avg_per_draw"]) > 1 for s in methods.values()):
        rows.append(
            {
                "structure": "Avg range over draws",
                **{
                    m: (
                        f"{min(s['avg_per_draw']):.3f}–{max(s['avg_per_draw']):.3f}"
                        if len(s["avg_per_draw"]) > 1
                        else "—"
                    )
                    for m, s in methods.items()
                },
            }
        )
    rows.append({"structure": "wAvg", **{m: f"{s['wavg']:.3f}" for m, s in methods.items()}})
    rows.append(
        {
            "structure": f"p vs {summary['baseline']} (Holm)",
            **{
                m: (f"{s['p_vs_baseline_holm']:.2g}" if "p_vs_baseline_holm" in s else "—")
                for m, s in methods.items()
            },
        }
    )
    return rows


def software(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Each distinct recorded environment (one line) → the run folders made with it."""
    out: dict[str, list[str]] = {}
    for run in runs:
        line = environment.describe(run.environment) if run.environment else "not recorded"
        out.setdefault(line, []).append(run.folder.name)
    return out


def markdown(summary: dict, title: str, notes: Sequence[str] = ()) -> str:
    """The report as Markdown: the method table, retention, and notes."""
    methods = list(summary["methods"])
    rows = table_rows(summary)
    lines = [f"# {title}", ""]
    lines += [
        "Dice per structure (mean ± std over test subjects × draws); Avg = mean of the 14 "
        "structures (over all draws of a method; its range over the draws below it); "
        "wAvg = docs/method.md §8's volume-weighted Dice; p = paired two-sided Wilcoxon "
        f"signed-rank test against {summary['baseline']} on subject × structure Dice (a "
        "method's draws averaged per subject first), Holm-corrected across the table. "
        "A cell ending (n of N) averages only the n subject×draw whose reference label has "
        "the structure.",
        "",
        "| structure | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for row in rows:
        lines.append(f"| {row['structure']} | " + " | ".join(row[m] for m in methods) + " |")
    runs = [
        f"{m}: {s['n_runs']} run(s), draws {s['draws']}, {s['n_subjects']} subject×draw"
        for m, s in summary["methods"].items()
    ]
    lines += ["", "Runs: " + "; ".join(runs) + "."]
    retained = {m: s["source_test"] for m, s in summary["methods"].items() if "source_test" in s}
    if retained:
        lines += [
            "",
            "## Source-domain retention",
            "",
            "The adapted models evaluated back on the source cohort's test subjects "
            "(no_tl is the source model itself: what the old scanner had before adaptation).",
            "",
            "| method | source Avg | source wAvg |",
            "|---|---|---|",
        ]
        lines += [f"| {m} | {v['avg']:.3f} | {v['wavg']:.3f} |" for m, v in retained.items()]
    if summary.get("quality"):
        q = summary["quality"]
        lines += [
            "",
            "## Quality score",
            "",
            f"The label-free quality score that predict.py writes (volumes.csv, qc.csv) ranks "
            f"the {q['n_pairs']} subject × structure segmentations of "
            f"{' and '.join(q['methods'])} with a Spearman correlation of {q['spearman']:.2f} "
            "against their true Dice (quality_vs_dice.png).",
        ]
    if notes:
        lines += ["", "## Findings", ""] + [f"- {n}" for n in notes]
    if summary.get("software"):
        lines += ["", "## Software", ""]
        if len(summary["software"]) > 1:
            lines += ["The runs were made with different software or machines:", ""]
        for line, folders in summary["software"].items():
            lines.append(f"- {line} ({len(folders)} run(s): {', '.join(sorted(folders))})")
    return "\n".join(lines) + "\n"


def transfer_curve(summary: dict, path: str | Path) -> Path:
    """Avg Dice against k, one line per method family (the paper's Fig. 4): ``learning_curve.png``.

    Not a run's learning curve per epoch (:func:`subseg.core.figures.learning_curve`): the
    protocol's, over the number of labelled target images.
    """
    methods = summary["methods"]
    families: dict[str, list[tuple[int, float, float]]] = {}
    for method, s in methods.items():
        family, k = family_of(method)
        per_draw = np.array(s["avg_per_draw"], dtype=float)
        spread = float(per_draw.std()) if per_draw.size > 1 else 0.0
        families.setdefault(family, []).append((k, s["avg"], spread))
    # No TL is TL with k = 0 (and Nyúl No TL is Nyúl + TL with k = 0).
    for start, family in (("no_tl", "tl"), ("nyul_no_tl", "nyul_tl")):
        if start in families and family in families:
            families[family] = families[start] + families[family]
    labels = dict(FAMILIES)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for family, points in families.items():
        points = sorted(points)
        if family not in ("no_tl", "nyul_no_tl") and [k for k, _, _ in points] == [0]:
            # Every target image (full training, tl_all): a level to reach, not a point at k=0.
            ax.axhline(points[0][1], linestyle="--", color="grey", linewidth=1)
            ax.annotate(labels.get(family, family), (0, points[0][1]), fontsize=8, va="bottom")
            continue
        ks, avg, spread = (np.array(v) for v in zip(*points, strict=True))
        ax.errorbar(ks, avg, yerr=spread, marker="o", capsize=3, label=labels.get(family, family))
    ax.set(xlabel="labelled target images k", ylabel="Avg Dice (14 structures)")
    ax.set_title("Transfer learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def structures_vs_k(summary: dict, path: str | Path, family: str = "tl") -> Path | None:
    """Per-structure Dice against k for one family, No TL at k = 0 (the paper's Fig. 3)."""
    points = []
    for method, s in summary["methods"].items():
        fam, k = family_of(method)
        if fam == family or (family == "tl" and method == "no_tl"):
            points.append((k, s["per_structure"]))
    if len(points) < 2:
        return None
    points.sort(key=lambda p: p[0])
    ks = [k for k, _ in points]
    pairs = [name.removeprefix("left_") for name in STRUCTURES if name.startswith("left_")]
    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(1, len(pairs), sharey=True)
    for ax, name in zip(axes, pairs, strict=True):
        for side in ("left", "right"):
            values = [p[f"{side}_{name}"]["mean"] for _, p in points]
            ax.plot(ks, values, marker="o", label=side)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice")
    axes[0].legend(fontsize=7)
    fig.supxlabel("labelled target images k (0 = No TL)")
    return save_figure(fig, path)


def quality_vs_dice(runs: Sequence[Run], path: str | Path, methods=("no_tl", "tl1")) -> dict | None:
    """How well the label-free quality score ranks segmentations, with a scatter figure.

    The Spearman correlation of the score with true Dice over the subject × structure pairs of
    ``methods``' runs.

    Returns:
        ``{"spearman", "n_pairs", "methods"}``, or ``None`` when the runs hold no scores (runs
        from before the score, or none of ``methods``).
    """
    pairs = [
        (row["qc"], row["dsc"], run.method)
        for run in runs
        if run.method in methods
        for row in run.rows
        if np.isfinite(row["qc"]) and np.isfinite(row["dsc"])
    ]
    if len(pairs) < 3:
        return None
    rho = stats.spearman([p[0] for p in pairs], [p[1] for p in pairs])
    fig = Figure(figsize=(5.6, 4.6))
    ax = fig.subplots()
    for method in methods:
        mine = [(q, d) for q, d, m in pairs if m == method]
        if mine:
            ax.scatter(*zip(*mine, strict=True), s=12, alpha=0.7, label=method)
    ax.set(
        xlabel="quality score (no label used)",
        ylabel="true Dice",
        title=f"Quality score vs true Dice: Spearman {rho:.2f} ({len(pairs)} pairs)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    used = sorted({m for _, _, m in pairs}, key=sort_key)
    return {"spearman": rho, "n_pairs": len(pairs), "methods": used}


def write_report(
    runs: Sequence[Run],
    out_dir: str | Path,
    baseline: str = "no_tl",
    title: str = "subseg transfer-learning report",
    notes: Sequence[str] = (),
) -> dict:
    """Write ``report.md``, ``report.csv``, ``summary.json`` and the figures to ``out_dir``.

    Returns:
        The summary written to ``summary.json``.
    """
    out_dir = io.ensure_writable(out_dir)
    summary = summarize_methods(runs, baseline)
    summary["runs"] = {str(r.folder): r.method for r in runs}
    summary["software"] = software(runs)
    checked = quality_vs_dice(runs, out_dir / "quality_vs_dice.png")
    if checked is not None:
        summary["quality"] = checked
    rows = table_rows(summary)
    io.write_csv(rows, ["structure", *summary["methods"]], out_dir / "report.csv")
    write_summary(summary, out_dir)
    with io.atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(markdown(summary, title, notes))
    transfer_curve(summary, out_dir / "learning_curve.png")
    structures_vs_k(summary, out_dir / "structures_vs_k.png")
    return summary


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    """Write a report's ``summary.json`` atomically."""
    path = Path(out_dir) / "summary.json"
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m subseg.report.report RUN_OR_SWEEP_FOLDER… --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m subseg.report.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folders", nargs="+", help="run folders or folders holding them")
    parser.add_argument("--out", required=True, help="where the report goes")
    parser.add_argument("--baseline", default="no_tl", help="method the p-values compare against")
    args = parser.parse_args(argv)
    with io.cli_errors():
        summary = write_report(find_runs(args.folders), args.out, args.baseline)
    for method, s in summary["methods"].items():
        print(f"{method:>14}: Avg {s['avg']:.3f}  wAvg {s['wavg']:.3f}  ({s['n_runs']} run(s))")
    print(f"subseg: report written to {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    main()
