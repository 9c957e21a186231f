"""The adaptation study: label-free methods and the labelling suggestion on four new scanners.

Four synthetic target scanners (``conf/dataset/synth_scanner_{a,b,c,d}.yaml``: other seeds,
sub-groups, contrast curves, resolutions, orientations and raters than the demo's target), each
with 12 scans: 4 fixed test scans and 8 candidates. On each scanner, with the same source model
and the same test scans:

- ``no_tl``: the source model as is;
- TL-1 on every candidate in turn (exhaustive: 8 runs);
- the label-free methods (``nyul_no_tl``, ``tl0_adabn``, ``tl0_nyul_adabn``, ``tl0_self``,
  ``tl0_adabn_self``), adapting to the candidates' images (their labels unread);
- ``tl1_self`` and ``tl1_adabn`` on ``suggest.py``'s first pick: its label plus the other
  candidates' pseudo-labels, or its label after AdaBN on the other candidates' images (one change
  against that scan's own TL-1 run);
- ``seeds`` (after ``tl1``): TL-1 on the best and the worst candidate again with two other
  seeds, so that the spread across candidates can be told from the seed's own;
- the suggestion scores of every candidate, read from the images only: coverage (mean distance
  to the other candidates in the source network's frozen-feature space, ``suggest.py``) and the
  source model's label-free quality score on it.

Every run is an ordinary ``finetune.py`` run folder under ``<out>/<scanner>/<run>`` (a complete
one is reused, so a killed study continues where it stopped). The tables go to
``<out>/study.md`` and ``<out>/study.json``.

    python studies/adaptation.py --source-run outputs/demo/runs/source

SYNTHETIC data: the numbers say how the methods behave across scanner shifts the generator
makes, not on real scanners.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import subseg
from subseg.core import io
from subseg.data import cohort
from subseg.evaluation import stats
from subseg.evaluation.stats import percentile_rank, spearman
from subseg.preprocessing.contract import as_dict
from subseg.report.report import read_metrics
from subseg.runs.run_folder import RunFolder
from subseg.tasks import finetune

SCANNERS = ("a", "b", "c", "d")
COMMON = [
    "logger=csv",
    "evaluate_source=false",
    "trainer.max_epochs=15",
    "stopping.patience=4",
    "trainer.max_time=00:00:30:00",
    "overwrite=true",
]
"""The demo's fine-tuning budget (``conf/demo.yaml``): epochs, not minutes. The wall-clock
safety net is looser than the demo's 8 min: the study shares the machine with other work, and a
run it stops is made again (:func:`_summary`)."""

SEEDS = (1, 2)
"""``seeds``: TL-1 on a scanner's best and worst candidate again with these seeds (the study's
runs use ``seed=0``), to tell the scan's effect from the seed's."""

LABEL_FREE = {
    "nyul_no_tl": ["target.n_images=0", "intensity=nyul"],
    "tl0_adabn": ["target.n_images=0", "adapt.label_free=adabn"],
    "tl0_nyul_adabn": ["target.n_images=0", "adapt.label_free=nyul_adabn"],
    "tl0_self": ["target.n_images=0", "adapt.label_free=self"],
    "tl0_adabn_self": ["target.n_images=0", "adapt.label_free=adabn_self"],
}
"""Label-free methods: ``finetune.py`` overrides (the pool is every non-test scan). Nyúl's
histogram standardisation reads no label either: ``nyul_no_tl`` always takes it,
``tl0_nyul_adabn`` only where the pool's label-free scores prefer it (then AdaBN)."""

WITH_ONE_LABEL = {"tl1_self": "self", "tl1_adabn": "adabn"}
"""One labelled scan (``suggest.py``'s first pick) with a label-free step on the other
candidates: ``adapt.label_free`` of each run."""


def _run(name: str, overrides: list[str], folder: Path) -> dict:
    run = RunFolder(folder)
    cfg = compose("finetune", overrides=overrides)
    run.config_file.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run.config_file, resolve=True)
    tick = time.perf_counter()
    summary = finetune.finetune(cfg, run.path)
    print(
        f"study: {folder.parent.name}/{name}: Avg {summary['avg']:.4f} "
        f"({time.perf_counter() - tick:.0f} s)"
    )
    return summary


def _summary(name: str, overrides: list[str], folder: Path) -> dict:
    """A run's summary: a complete run folder is read back, otherwise the run is made.

    A complete run is reused whatever the code's config keys became since: the study continues
    where it stopped. A run the wall-clock safety net stopped is made again: its number would
    depend on what else the machine was doing.
    """
    run = RunFolder(folder)
    if run.is_complete():
        summary = run.summary()
        if summary.get("fit", {}).get("stopped_by") != "max_time":
            return summary
        print(f"study: {folder.parent.name}/{name} was stopped by the clock: running it again")
    return _run(name, overrides, folder)


def scanner_setup(scanner: str) -> tuple[str, list[str], list[str]]:
    """A scanner's dataset name, test scans and TL-1 candidates (its cohort generated)."""
    dataset = f"synth_scanner_{scanner}"
    data = as_dict(compose("finetune", overrides=[f"dataset={dataset}"]).dataset)
    cohort.prepare(data)
    test = sorted(str(i) for i in data["test_ids"])
    candidates = sorted(s.id for s in cohort.list_subjects(data) if s.id not in set(test))
    return dataset, test, candidates


def tl1_round_robin(scanners, source_run: str, out: Path) -> None:
    """TL-1 on every candidate of every scanner, one candidate per scanner in turn.

    Each scanner's candidates go in a seeded random order: a study stopped partway has a fair
    sample of each scanner.
    """
    orders = {}
    for scanner in scanners:
        candidates = scanner_setup(scanner)[2]
        orders[scanner] = list(np.random.default_rng(0).permutation(candidates))
    for index in range(max(len(order) for order in orders.values())):
        for scanner in scanners:
            if index < len(orders[scanner]):
                scan = str(orders[scanner][index])
                base = [f"dataset=synth_scanner_{scanner}", f"source_run={source_run}", *COMMON]
                _summary(
                    f"tl1 on {scan}",
                    [*base, "target.n_images=1", f"target.ids=[{scan}]"],
                    out / scanner / f"tl1_{scan}",
                )


def scanner_runs(scanner: str, source_run: str, out: Path, methods: list[str]) -> dict:
    """The runs ``methods`` names on one scanner; returns ``{run name: summary}``."""
    dataset, _, candidates = scanner_setup(scanner)
    base = [f"dataset={dataset}", f"source_run={source_run}", *COMMON]
    folder = out / scanner
    results = {}
    if "no_tl" in methods:
        results["no_tl"] = _summary("no_tl", [*base, "target.n_images=0"], folder / "no_tl")
    for method, overrides in LABEL_FREE.items():
        if method in methods:
            results[method] = _summary(method, [*base, *overrides], folder / method)
    for method, step in WITH_ONE_LABEL.items():  # the suggested scan's label and the pool
        if method in methods:
            pick = suggestion_scores(scanner, source_run, out, candidates)["coverage_ranking"][0]
            results[method] = _summary(
                method,
                [*base, "target.n_images=1", f"target.ids=[{pick}]", f"adapt.label_free={step}"],
                folder / method,
            )
    if "seeds" in methods:  # how much of TL-1's spread across scans the seed alone gives
        tl1 = {c: RunFolder(folder / f"tl1_{c}").summary()["avg"] for c in candidates}
        for scan in (max(tl1, key=tl1.get), min(tl1, key=tl1.get)):
            for seed in SEEDS:
                name = f"tl1_{scan}_seed{seed}"
                results[name] = _summary(
                    name,
                    [*base, "target.n_images=1", f"target.ids=[{scan}]", f"seed={seed}"],
                    folder / "seeds" / name,
                )
    if "tl1" in methods:
        for scan in candidates:
            results[f"tl1_{scan}"] = _summary(
                f"tl1 on {scan}",
                [*base, "target.n_images=1", f"target.ids=[{scan}]"],
                folder / f"tl1_{scan}",
            )
    return results


def suggestion_scores(scanner: str, source_run: str, out: Path, candidates: list[str]) -> dict:
    """Each candidate's label-free suggestion scores: coverage and the source's weakness.

    - ``distance``: mean distance to the other candidates in the source network's frozen-feature
      space (``suggest.py``'s space; the lowest is the medoid, its first pick today);
    - ``source_qc``: the source model's mean quality score on the scan (``tl0_adabn`` segmented
      every candidate with it before adapting; lower: the source does worse there).
    """
    from subseg.runs.trained_model import model_of
    from subseg.tasks import suggest

    cached = out / scanner / "suggestion_scores.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    named = OmegaConf.create({"run_dir": source_run, "ckpt": None, "brain": None, "threads": 0})
    model = model_of(named)
    dataset = as_dict(compose("finetune", overrides=[f"dataset=synth_scanner_{scanner}"]).dataset)
    images = {s.id: s.image for s in cohort.list_subjects(dataset) if s.id in set(candidates)}
    features = suggest.features_of(model.net, model.contract, images)
    ids, d = suggest.distances(features)
    n = len(ids)
    distance = {i: float(d[k].sum() / (n - 1)) for k, i in enumerate(ids)}
    adabn = RunFolder(out / scanner / "tl0_adabn")
    record = adabn.read_json(adabn.transfer_file)
    scores = {
        "distance": distance,
        "source_qc": record["label_free"]["source_scan_qc"],
        "coverage_ranking": [row["scan"] for row in suggest.coverage_ranking(ids, d)],
    }
    with io.atomic_path(cached) as tmp:
        tmp.write_text(json.dumps(scores, indent=2))
    return scores


def tl1_alone(run_dir: Path, tl1: dict[str, float]) -> dict | None:
    """The TL-1 run on the scan a one-label-plus-pool run labelled: its one-change comparison.

    Args:
        run_dir: a ``tl1_self`` or ``tl1_adabn`` run folder.
        tl1: the scanner's exhaustive TL-1, ``{candidate: Avg Dice}``.

    Returns:
        ``{"scan", "tl1"}``, or ``None`` when that scan's TL-1 run is not complete.
    """
    (scan,) = RunFolder(run_dir).split("train")
    return {"scan": scan, "tl1": tl1[scan]} if scan in tl1 else None


RULES = {
    "coverage (medoid)": lambda s, ids: min(ids, key=lambda i: s["distance"][i]),
    "weakness (lowest source QC)": lambda s, ids: min(ids, key=lambda i: s["source_qc"][i]),
    "outlier (farthest)": lambda s, ids: max(ids, key=lambda i: s["distance"][i]),
    "mix (rank sum: weak and typical)": lambda s, ids: min(
        ids,
        key=lambda i: (
            sorted(ids, key=lambda j: s["source_qc"][j]).index(i)
            + sorted(ids, key=lambda j: s["distance"][j]).index(i)
        ),
    ),
}
"""Candidate suggestion rules: each picks one scan from the label-free scores."""


def analyse(args) -> dict:
    """The study's tables from its run folders: label-free methods and suggestion rules."""
    table, rules = {}, {name: {} for name in RULES}
    correlations = {}
    for scanner in args.scanners:
        _, test, candidates = scanner_setup(scanner)
        folder = args.out / scanner
        read = {
            name: RunFolder(folder / name).summary()
            for name in ["no_tl", *LABEL_FREE, *WITH_ONE_LABEL, *(f"tl1_{c}" for c in candidates)]
            if RunFolder(folder / name).is_complete()
        }
        tl1 = {c: read[f"tl1_{c}"]["avg"] for c in candidates if f"tl1_{c}" in read}
        row = {"test": test, "candidates": len(candidates)}
        row.update(
            {m: read[m]["avg"] for m in ["no_tl", *LABEL_FREE, *WITH_ONE_LABEL] if m in read}
        )
        for m in WITH_ONE_LABEL:  # set against the same scan's TL-1 alone
            if m in read and (alone := tl1_alone(folder / m, tl1)) is not None:
                row[f"{m}_alone"] = alone
        for m in [*LABEL_FREE, *WITH_ONE_LABEL] if "no_tl" in read else ():
            baseline = stats.dice_by_pair(read_metrics(RunFolder(folder / "no_tl").metrics_file))
            if m in read and "label_free" in read[m]:
                row[f"{m}_guard"] = read[m]["label_free"]["steps"]
                mine = stats.dice_by_pair(read_metrics(RunFolder(folder / m).metrics_file))
                row[f"{m}_p"] = stats.wilcoxon(*stats.paired(mine, baseline))
        if len(tl1) == len(candidates):
            row["tl1_mean"] = float(np.mean(list(tl1.values())))
            row["tl1_min"], row["tl1_max"] = min(tl1.values()), max(tl1.values())
            row["tl1"] = tl1
            if "tl0_adabn" in read:
                scores = suggestion_scores(scanner, args.source_run, args.out, candidates)
                for name, rule in RULES.items():
                    pick = rule(scores, candidates)
                    rules[name][scanner] = {
                        "scan": pick,
                        "tl1": tl1[pick],
                        "percentile": percentile_rank(
                            tl1[pick], [v for c, v in tl1.items() if c != pick]
                        ),
                    }
                values = [tl1[c] for c in candidates]
                correlations[scanner] = {
                    key: spearman([scores[key][c] for c in candidates], values)
                    for key in ("distance", "source_qc")
                }
        seeds = {}
        for scan in tl1:
            runs = [RunFolder(folder / "seeds" / f"tl1_{scan}_seed{k}") for k in SEEDS]
            if all(r.is_complete() for r in runs):
                seeds[scan] = [tl1[scan], *(r.summary()["avg"] for r in runs)]
        if seeds:
            row["seeds"] = seeds
        table[scanner] = row
    study = {"scanners": table, "rules": rules, "spearman_vs_tl1": correlations}
    with io.atomic_path(args.out / "study.json") as tmp:
        tmp.write_text(json.dumps(study, indent=2))
    (args.out / "study.md").write_text(markdown(study))
    print(markdown(study))
    return study


def markdown(study: dict) -> str:
    """The study's tables as Markdown: methods per scanner, the goals' averages, the rules."""
    scanners = study["scanners"]
    methods = ["no_tl", *LABEL_FREE, *WITH_ONE_LABEL]
    lines = [
        "| scanner | " + " | ".join(methods) + " | TL-1 on each candidate: mean (min–max) |",
        "|---" * (len(methods) + 2) + "|",
    ]
    for scanner, row in scanners.items():
        cells = [_cell(row, m) for m in methods]
        tl1 = (
            f"{row['tl1_mean']:.4f} ({row['tl1_min']:.3f}–{row['tl1_max']:.3f})"
            if "tl1_mean" in row
            else "—"
        )
        lines.append(f"| {scanner} | " + " | ".join(cells) + f" | {tl1} |")
    done = [r for r in scanners.values() if "tl1_mean" in r and "no_tl" in r]
    if done:
        tl1_gain = float(np.mean([r["tl1_mean"] - r["no_tl"] for r in done]))
        lines += ["", f"Mean gain over No TL on {len(done)} scanners: TL-1 {tl1_gain:+.4f}"]
        for m in LABEL_FREE:
            gains = [r[m] - r["no_tl"] for r in done if m in r]
            if len(gains) == len(done):
                lines[-1] += (
                    f"; {m} {np.mean(gains):+.4f} ({np.mean(gains) / tl1_gain:.2f} of TL-1's,"
                    f" lowest {min(gains):+.4f})"
                )
        lines[-1] += "."
    for scanner, row in scanners.items():
        for m in WITH_ONE_LABEL:
            if f"{m}_alone" in row:
                alone = row[f"{m}_alone"]
                lines.append(
                    f"- {scanner}: {m} on {alone['scan']} {row[m]:.4f}, against TL-1 on it alone "
                    f"{alone['tl1']:.4f} ({row[m] - alone['tl1']:+.4f})"
                )
    for scanner, row in scanners.items():
        for scan, values in (row.get("seeds") or {}).items():
            lines.append(
                f"- {scanner}: TL-1 on {scan} with seeds 0, {', '.join(map(str, SEEDS))}: "
                + ", ".join(f"{v:.4f}" for v in values)
                + f" (mean {np.mean(values):.4f}, sd {np.std(values, ddof=1):.4f})"
            )
    if study["rules"] and any(study["rules"].values()):
        lines += ["", "| suggestion rule | " + " | ".join(scanners) + " | mean percentile |"]
        lines.append("|---" * (len(scanners) + 2) + "|")
        for name, picks in study["rules"].items():
            cells = [
                f"{picks[s]['scan']} {picks[s]['tl1']:.4f} ({picks[s]['percentile']:.0f})"
                if s in picks
                else "—"
                for s in scanners
            ]
            mean = np.mean([p["percentile"] for p in picks.values()]) if picks else np.nan
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.0f} |")
    return "\n".join(lines) + "\n"


def _cell(row: dict, method: str) -> str:
    """One method's table cell: Avg Dice, its p against No TL, and any step the guard undid."""
    if method not in row:
        return "—"
    text = f"{row[method]:.4f}"
    if f"{method}_p" in row:
        text += f" (p {row[method + '_p']:.2g})"
    steps = [s for s in row.get(f"{method}_guard") or () if not s.get("kept", True)]
    if any(s["step"] == "nyul" for s in steps):  # a choice of input, not a step undone
        text += " [Nyúl's input not used]"
    undone = [s["step"] for s in steps if s["step"] != "nyul"]
    if undone:
        text += f" [guard undid {', '.join(undone)}]"
    return text


def main(argv: list[str] | None = None) -> None:
    """Command line: run the study (complete runs are reused) and write its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-run", required=True, help="a train.py run folder")
    parser.add_argument("--out", type=Path, default=Path("outputs/study"))
    parser.add_argument("--scanners", nargs="+", default=list(SCANNERS), choices=SCANNERS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["no_tl", "tl1", *LABEL_FREE, *WITH_ONE_LABEL],
        help="which runs to make (tl1: every candidate in turn; seeds: the best and worst "
        "candidate's TL-1 again with other seeds, after tl1)",
    )
    parser.add_argument("--analyse-only", action="store_true", help="only write the tables")
    args = parser.parse_args(argv)
    with initialize_config_dir(str(subseg.CONF_DIR), version_base=None):
        # Every scanner's label-free runs first, then the exhaustive TL-1 runs, then the runs
        # compared with them (one label plus the pool; other seeds).
        later = [*WITH_ONE_LABEL, "seeds"]  # after TL-1: they are compared with its runs
        first = [m for m in args.methods if m not in ("tl1", *later)]
        if not args.analyse_only:
            for scanner in args.scanners:
                scanner_runs(scanner, args.source_run, args.out, first)
            if "tl1" in args.methods:
                tl1_round_robin(args.scanners, args.source_run, args.out)
            for method in later:
                for scanner in args.scanners if method in args.methods else ():
                    scanner_runs(scanner, args.source_run, args.out, [method])
        analyse(args)


if __name__ == "__main__":
    sys.exit(main())
