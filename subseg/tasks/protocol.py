"""The paper's protocol end to end, as ``make demo`` runs it on the synthetic cohorts.

Train a source model (or reuse a finished one), run every method of ``cfg.methods`` as a
fine-tuning run (No TL, TL-k, scratch-k, Nyúl …: each one a set of ``finetune.py`` overrides,
not code), gather them with :mod:`subseg.report.report`, and check the paper's qualitative findings.
Each step is the same function the entry points call, on a config composed by Hydra.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from subseg.core import io
from subseg.data import cohort
from subseg.evaluation import metrics, stats
from subseg.preprocessing import brain
from subseg.preprocessing.contract import as_dict
from subseg.report import report
from subseg.runs.run_folder import RunFolder, run_hash
from subseg.tasks import finetune, train


def _compose(name: str, overrides: list[str], run: RunFolder) -> DictConfig:
    """Compose a task config and record it in the run folder, as Hydra's own runs do."""
    cfg = compose(name, overrides=overrides)
    run.config_file.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run.config_file, resolve=True)
    return cfg


def findings(methods: Mapping[str, Mapping]) -> list[dict]:
    """The paper's qualitative findings, each checked on the methods' Avg Dice.

    Returns:
        One dict per finding that the methods allow checking: ``claim``, ``holds``, ``values``
        (the claimed-better method first) and, for one that does not hold, ``per_structure``:
        the claimed-better method's Dice minus the other's for each structure, largest first —
        the evidence of where the claim fails.
    """
    avg = {m: s["avg"] for m, s in methods.items()}
    checks = [  # (claim, claimed better, other, test on their Avg Dice)
        (
            "No TL clearly below TL-1 (by >= 0.10 Avg Dice)",
            "tl1",
            "no_tl",
            lambda b, o: b - o >= 0.10,
        ),
        ("TL-3 >= TL-1", "tl3", "tl1", lambda b, o: b >= o),
        ("TL-3 > scratch-3", "tl3", "scratch3", lambda b, o: b > o),
        ("Nyúl No TL > plain No TL", "nyul_no_tl", "no_tl", lambda b, o: b > o),
    ]
    out = []
    for claim, better, other, test in checks:
        if better not in avg or other not in avg:
            continue
        finding = {
            "claim": claim,
            "holds": bool(test(avg[better], avg[other])),
            "values": {better: avg[better], other: avg[other]},
        }
        if not finding["holds"]:
            ours, theirs = methods[better]["per_structure"], methods[other]["per_structure"]
            gains = {name: ours[name]["mean"] - theirs[name]["mean"] for name in ours}
            finding["per_structure"] = dict(sorted(gains.items(), key=lambda kv: -kv[1]))
        out.append(finding)
    return out


def finding_note(finding: Mapping) -> str:
    """One line of the report for a finding, with the per-structure evidence when it fails."""
    values = finding["values"]
    text = f"{'holds' if finding['holds'] else 'does NOT hold'}: {finding['claim']} — " + ", ".join(
        f"{k} {v:.3f}" for k, v in values.items()
    )
    if "per_structure" in finding:
        better, other = values
        gains = ", ".join(f"{name} {d:+.3f}" for name, d in finding["per_structure"].items())
        text += f". Per structure, {better} − {other}: {gains}"
    return text


def run(cfg: DictConfig) -> dict:
    """Run the protocol of a ``conf/demo*.yaml`` config and write the report.

    Writes to ``cfg.output_dir``: ``runs/source`` (unless ``cfg.source_run`` names a complete
    run), ``runs/<method>`` for every method (``runs/<method>_d<j>`` for its further draws in
    ``cfg.draws``), ``report.md``, ``report.csv``, ``summary.json``, ``learning_curve.png`` and
    ``structures_vs_k.png``. The report says which runs, if any, their wall-clock safety net
    stopped (their numbers would depend on the machine's speed). A run already complete with
    the same config and source is reused, so a killed demo run again continues where it stopped.

    Returns:
        The report's summary (with ``findings``).
    """
    out_dir = Path(cfg.output_dir)
    # The demo's run folders are its own: a changed demo config replaces them (overwrite=true).
    common = [
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.output_dir={cfg.paths.output_dir}",
        "overwrite=true",
    ]
    started = time.perf_counter()
    source, timings = _source(cfg, out_dir, common)
    folders, capped, more = _fine_tune_all(cfg, source, out_dir, common)
    timings.update(more)
    source_summary = source.summary()
    if source_summary.get("fit", {}).get("stopped_by") == "max_time":
        capped.insert(0, ("source", source_summary["fit"]))
    runs = report.find_runs(folders)
    methods = report.summarize_methods(runs, "no_tl")["methods"]
    checked = findings(methods)
    suggested = suggestion_finding(methods, runs)
    label_free = label_free_findings(methods, label_free_accounts(runs))
    extraction = brain_extraction_quality(RunFolder(folders[0])) if folders else None
    notes = _notes(checked, methods, source_summary, capped, suggested)
    notes += _label_free_notes(label_free) + _brain_note(extraction) + list(cfg.report_notes)
    summary = report.write_report(runs, out_dir, "no_tl", title=str(cfg.report_title), notes=notes)
    summary["findings"] = checked
    if suggested is not None:
        summary["suggestion"] = suggested
    if label_free:
        summary["label_free"] = label_free
    if extraction is not None:
        summary["brain_extraction"] = extraction
    summary["capped"] = [name for name, _ in capped]
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    summary["seconds"]["total"] = round(time.perf_counter() - started, 1)
    report.write_summary(summary, out_dir)
    for note in notes[: len(checked)]:
        print(f"subseg demo: {note}")
    print(f"subseg demo: report in {out_dir / 'report.md'} ({summary['seconds']['total']:.0f} s)")
    return summary


def _source(cfg: DictConfig, out_dir: Path, common: list[str]) -> tuple[RunFolder, dict]:
    """The source run: the one ``cfg.source_run`` names, a complete one reused, or trained now.

    Returns:
        (the complete source run folder, ``{"source": seconds}`` when it was trained now).
    """
    source = RunFolder(cfg.source_run if cfg.source_run else out_dir / "runs" / "source")
    if cfg.source_run:
        source.require_complete()
        print(f"subseg demo: using the source run {source.path}")
        return source, {}
    overrides = [*common, f"dataset={cfg.source.name}", *cfg.train_overrides]
    train_cfg = _compose("train", overrides, source)
    if source.is_complete(
        run_hash(train_cfg, data=cohort.file_digests(as_dict(train_cfg.dataset)))
    ):
        print(f"subseg demo: reusing the source run {source.path} (complete, same config)")
        return source, {}
    print("subseg demo: [source] training on the source cohort")
    tick = time.perf_counter()
    train.train(train_cfg, source.path)
    return source, {"source": time.perf_counter() - tick}


def _fine_tune_all(cfg: DictConfig, source: RunFolder, out_dir: Path, common: list[str]):
    """Every method × draw of ``cfg`` as a fine-tuning run (complete ones are reused).

    Returns:
        (the run folders, [(name, fit record)] of runs the clock stopped, seconds per run).
    """
    every = set(cfg.get("every_candidate") or [])
    candidates = _candidates(cfg, common) if every else []
    jobs = []
    for method in cfg.methods:
        if method in every:  # one run per candidate scan: what TL-1 gives on each of them
            jobs += [(method, f"{method}_{scan}", [f"target.ids=[{scan}]"]) for scan in candidates]
        else:
            jobs += [
                (method, method if draw == 0 else f"{method}_d{draw}", [f"target.draw={draw}"])
                for draw in (cfg.get("draws") or {}).get(method, [0])
            ]
    folders, capped, timings = [], [], {}
    for index, (method, name, chosen) in enumerate(jobs, 1):
        print(f"subseg demo: [{index}/{len(jobs)}] {name}")
        tick = time.perf_counter()
        run = RunFolder(out_dir / "runs" / name)
        overrides = [
            *common,
            f"dataset={cfg.target.name}",
            f"source_run={source.path}",
            *cfg.target_overrides,
            *cfg.finetune_overrides,
            *cfg.methods[method],
            *chosen,
        ]
        summary = finetune.finetune(_compose("finetune", overrides, run), run.path)
        if summary.get("method") != method:
            raise ValueError(
                f"demo method {method} ran as {summary.get('method')}: fix its overrides"
            )
        if summary.get("fit", {}).get("stopped_by") == "max_time":
            capped.append((name, summary["fit"]))
        folders.append(run.path)
        timings[name] = time.perf_counter() - tick
    return folders, capped, timings


def _candidates(cfg: DictConfig, common: list[str]) -> list[str]:
    """The target's labelled scans outside its test list: those a TL-1 run may train on."""
    composed = compose(
        "finetune", overrides=[*common, f"dataset={cfg.target.name}", *cfg.target_overrides]
    )
    dataset = as_dict(composed.dataset)
    cohort.prepare(dataset)
    test = {str(i) for i in dataset.get("test_ids") or []}
    return [
        s.id
        for s in cohort.list_subjects(dataset, require_labels=False)
        if s.label is not None and s.id not in test
    ]


def brain_extraction_quality(run: RunFolder) -> dict | None:
    """How well brain extraction found the brain of a run's cohort, where the truth is known.

    A synthetic cohort of heads (``fov: head``) holds each scan's true brain mask in
    ``masks/<id>.nii.gz``; each scan's mask (from the cache, as the run made it) is scored
    against it with Dice.

    Returns:
        ``{"n", "methods": {method: count}, "dice_mean", "dice_sd", "dice_min", "per_scan"}``,
        or ``None`` for a cohort without true masks.
    """
    dataset = run.config()["dataset"]
    truth_dir = Path(dataset["root"]) / "masks"
    if not truth_dir.is_dir():
        return None
    preprocess = run.contract().preprocess
    per_scan, methods = {}, {}
    for subject in cohort.list_subjects({**dataset, "ids": None}, require_labels=False):
        truth_file = truth_dir / f"{subject.id}.nii.gz"
        if not truth_file.is_file():
            continue
        image = io.load_image(subject.image)
        found = brain.brain_mask(image.path, image.data, image.affine, preprocess)
        truth = io.load_label(truth_file, image=image).data > 0
        overlap = 2.0 * np.count_nonzero(found.mask & truth)
        per_scan[subject.id] = overlap / max(int(found.mask.sum() + truth.sum()), 1)
        methods[found.method] = methods.get(found.method, 0) + 1
    if not per_scan:
        return None
    values = np.array(list(per_scan.values()))
    return {
        "n": len(values),
        "methods": methods,
        "dice_mean": float(values.mean()),
        "dice_sd": float(values.std()),
        "dice_min": float(values.min()),
        "per_scan": {k: round(float(v), 4) for k, v in per_scan.items()},
    }


def _brain_note(found: Mapping | None) -> list[str]:
    if found is None:
        return []
    how = ", ".join(f"{method} on {n}" for method, n in found["methods"].items())
    return [
        f"Brain extraction of the target's {found['n']} scans as the scanner wrote them (skull, "
        f"scalp, neck; {how}): mask Dice {found['dice_mean']:.3f} ± {found['dice_sd']:.3f} "
        f"(lowest {found['dice_min']:.3f}) against each scan's true brain mask."
    ]


def suggestion_finding(methods: Mapping[str, Mapping], runs=()) -> dict | None:
    """Whether TL-1 on suggest.py's top scan reached TL-1's mean over the other scans.

    With a TL-1 run on every candidate (``every_candidate``), the mean is what a random pick
    gives on average, and ``percentile`` says where the suggested scan's TL-1 stands among them:
    the share of the other candidates' TL-1 it reaches (100: the best scan to label).

    Args:
        methods: the report's per-method summaries.
        runs: the report's runs (:class:`subseg.report.report.Run`), for the scans each one
            trained on.

    Returns:
        ``{"holds", "suggested", "random_mean", "random_min", "random_max", "draws", "scans",
        "percentile"}`` or ``None`` when the demo ran no ``tl1_suggested`` or no random TL-1.
    """
    if "tl1_suggested" not in methods or "tl1" not in methods:
        return None
    random = [float(v) for v in methods["tl1"]["avg_per_draw"]]
    suggested = float(methods["tl1_suggested"]["avg"])
    scans, by_scan = {}, {}
    for run in runs:
        if run.method in ("tl1", "tl1_suggested"):
            trained = RunFolder(run.folder).split("train")
            scans.setdefault(run.method, []).extend(trained)
            if run.method == "tl1":
                by_scan[tuple(trained)] = metrics.summarize(run.rows)["avg"]
    # The others: the TL-1 runs on other scans than the suggested one (its own twin left out).
    picked = tuple(scans.get("tl1_suggested") or ())
    others = [v for s, v in by_scan.items() if s != picked] if by_scan else random
    return {
        "holds": bool(suggested >= float(np.mean(random))),
        "percentile": stats.percentile_rank(suggested, others),
        "suggested": suggested,
        "random_mean": float(np.mean(random)),
        "random_min": min(random),
        "random_max": max(random),
        "draws": len(random),
        "scans": scans,
    }


def label_free_accounts(runs) -> dict[str, dict]:
    """Each label-free method's ``label_free`` account, from its first run's ``summary.json``."""
    accounts = {}
    for run in runs:
        account = RunFolder(run.folder).summary().get("label_free")
        if account is not None:
            accounts.setdefault(run.method, account)
    return accounts


def label_free_findings(methods: Mapping[str, Mapping], accounts: Mapping[str, Mapping]) -> list:
    """What each label-free method (``adapt.label_free``) recovered of TL-1's gain.

    The gains are over No TL on the same test scans; TL-1's is the mean over its runs (with a
    run on every candidate, what a random labelled scan gives on average).

    Args:
        methods: the report's per-method summaries.
        accounts: each label-free method's ``label_free`` account (:func:`label_free_accounts`).

    Returns:
        One ``{"method", "avg", "gain", "tl1_gain", "share", "pool", "steps"}`` per label-free
        method (``share``: ``gain / tl1_gain``, ``None`` where TL-1 did not gain), or ``[]``
        without No TL.
    """
    if "no_tl" not in methods:
        return []
    baseline = float(methods["no_tl"]["avg"])
    tl1 = methods.get("tl1", {}).get("avg_per_draw")
    tl1_gain = float(np.mean(tl1)) - baseline if tl1 else None
    found = []
    for method, account in sorted(accounts.items()):
        if method not in methods:
            continue
        gain = float(methods[method]["avg"]) - baseline
        found.append(
            {
                "method": method,
                "avg": float(methods[method]["avg"]),
                "gain": gain,
                "tl1_gain": tl1_gain,
                "share": gain / tl1_gain if tl1_gain and tl1_gain > 0 else None,
                "pool": account["pool"],
                "steps": account["steps"],
            }
        )
    return found


def _label_free_notes(found: list[Mapping]) -> list[str]:
    notes = []
    for item in found:
        if item["tl1_gain"] is None:
            versus = "no TL-1 run to compare it with"
        elif item["share"] is None:
            versus = f"TL-1 did not gain over No TL here ({item['tl1_gain']:+.4f})"
        else:
            versus = (
                f"{item['share']:.2f} of TL-1's mean gain ({item['tl1_gain']:+.4f}) with one "
                "labelled scan"
            )
        steps = "; ".join(
            f"{_step_verdict(step)} (the pool's quality score {step['pool_qc_before']:.3f} → "
            f"{step['pool_qc_after']:.3f}, atlas agreement {step['pool_agreement_before']:.3f} → "
            f"{step['pool_agreement_after']:.3f})"
            for step in item["steps"]
            if "pool_qc_before" in step
        )
        said = (
            f"{item['method']} adapted to {item['pool']} unlabelled scans (their labels unread): "
            f"Avg {item['avg']:.4f}, {item['gain']:+.4f} over No TL, {versus}."
        )
        notes.append(f"{said} Its guard: {steps}." if steps else said)
    return notes


def _step_verdict(step: Mapping) -> str:
    kept = step.get("kept", True)
    if step["step"] == "nyul":  # a choice between two inputs: nothing was done to undo
        return "Nyúl's input chosen" if kept else "Nyúl's input not used (the model's own kept)"
    return f"{step['step']} {'kept' if kept else 'undone'}"


def _suggestion_note(found: Mapping | None) -> list[str]:
    if found is None:
        return []
    verdict = "reached" if found["holds"] else "did NOT reach"
    scans = found.get("scans") or {}
    drawn = f", scans {', '.join(scans['tl1'])}" if scans.get("tl1") else ""
    picked = f" ({', '.join(scans['tl1_suggested'])})" if scans.get("tl1_suggested") else ""
    gap = found["suggested"] - found["random_mean"]
    return [
        f"TL-1 on the scan suggest.py ranks first{picked}, chosen reading no label: Avg "
        f"{found['suggested']:.4f}. TL-1 on each of the {found['draws']} scans in turn: mean "
        f"{found['random_mean']:.4f} ({found['random_min']:.3f}–{found['random_max']:.3f}"
        f"{drawn}). The suggestion {verdict} that mean ({gap:+.4f}) and reaches the TL-1 of "
        f"{found['percentile']:.0f} % of the scans, on the same test scans (the ranking and its "
        "figure: runs/tl1_suggested/suggest.csv and suggest.png)."
    ]


def _notes(
    checked: list[dict], methods: Mapping, source_summary: Mapping, capped, suggested=None
) -> list[str]:
    """The report's findings: each claim checked, the source's headroom, clock-capped runs."""
    notes = [finding_note(f) for f in checked]
    if "no_tl" in methods:
        notes.append(
            f"The source model scores {source_summary['avg']:.3f} on its own scanner's test scans "
            f"and {methods['no_tl']['avg']:.3f} on the target's (No TL): the gap any "
            "adaptation can close, besides the target rater's different boundaries."
        )
    notes += _suggestion_note(suggested)
    notes += [
        f"{name} was stopped by its wall-clock safety net (trainer.max_time={fit['max_time']}) "
        f"after {fit['epochs']} of {fit['max_epochs']} epochs: its numbers depend on this "
        "machine's speed"
        for name, fit in capped
    ] or ["Every training run ended by its epoch budget or early stopping, not by the clock."]
    return notes
