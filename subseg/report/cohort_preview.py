"""What the demo's cohorts look like: subjects, grids, intensities, volumes, one picture each.

``make demo`` starts here, so a reader sees the data before any result; summarising a cohort
also loads every subject through the checks, so it validates the cohort too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig

from subseg.core import figures, io, overlay
from subseg.core import labels as label_protocol
from subseg.data import cohort
from subseg.preprocessing import transforms
from subseg.preprocessing.contract import as_dict


def summarize_cohort(dataset: Mapping) -> dict:
    """Describe a cohort: subjects, grids, voxel sizes, intensity ranges and structure volumes.

    Every subject goes through the loading half of the MONAI pipeline (checks, canonical
    orientation, label mapping), so a summary also validates the cohort.

    Args:
        dataset: a ``conf/dataset`` entry.

    Returns:
        A JSON-ready dict.
    """
    dataset = as_dict(dataset)
    subjects = cohort.list_subjects(dataset)
    load = transforms.preprocessing(dataset["label_ids"], normalize=False)
    rows = []
    for subject in subjects:
        item = load(subject.as_item())
        image = item["image"]
        stored = nib.load(subject.image)
        row = {
            "id": subject.id,
            "group": subject.group,
            "shape": list(stored.shape[:3]),
            "voxel_mm": [round(float(z), 4) for z in stored.header.get_zooms()[:3]],
            "orientation": "".join(nib.aff2axcodes(stored.affine)),
            "intensity_min": float(image.min()),
            "intensity_max": float(image.max()),
        }
        if item.get("label") is not None:
            counts = np.bincount(
                item["label"].numpy().ravel(), minlength=label_protocol.NUM_CLASSES
            )
            voxel = float(image.meta["voxel_volume_mm3"])
            row["volumes_mm3"] = {
                name: float(counts[c] * voxel)
                for c, name in enumerate(label_protocol.STRUCTURES, 1)
            }
        rows.append(row)
    volumes = {}
    labelled = [r for r in rows if "volumes_mm3" in r]
    for name in label_protocol.STRUCTURES:
        values = np.array([r["volumes_mm3"][name] for r in labelled])
        if values.size:
            volumes[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return {
        "name": dataset.get("name"),
        "root": str(dataset["root"]),
        "n_subjects": len(rows),
        "groups": dict(Counter(r["group"] for r in rows if r["group"])),
        "orientations": sorted({r["orientation"] for r in rows}),
        "voxel_mm": sorted({tuple(r["voxel_mm"]) for r in rows}),
        "shapes": sorted({tuple(r["shape"]) for r in rows}),
        "intensity_max": [
            min(r["intensity_max"] for r in rows),
            max(r["intensity_max"] for r in rows),
        ],
        "structure_volumes_mm3": volumes,
        "subjects": rows,
    }


def format_summary(summary: Mapping) -> str:
    """Render a cohort summary as Markdown (a header block and a volume table)."""
    lines = [
        f"### {summary['name']} — {summary['n_subjects']} subjects (SYNTHETIC where generated)",
        "",
        f"- root: `{summary['root']}`",
        f"- scanner groups: {summary['groups'] or 'one'}",
        f"- stored orientation: {', '.join(summary['orientations'])}; "
        f"voxel size (mm): {', '.join('×'.join(f'{v:g}' for v in z) for z in summary['voxel_mm'])}",
        f"- grids: {', '.join('×'.join(map(str, s)) for s in summary['shapes'][:3])}"
        + (" …" if len(summary["shapes"]) > 3 else ""),
        f"- intensity maximum: {summary['intensity_max'][0]:g} – {summary['intensity_max'][1]:g}",
        "",
        "| structure | volume mm³ (mean ± std) |",
        "|---|---|",
    ]
    for name, stats in summary["structure_volumes_mm3"].items():
        lines.append(f"| {name} | {stats['mean']:.0f} ± {stats['std']:.0f} |")
    return "\n".join(lines) + "\n"


def preview_cohorts(datasets: Mapping[str, Mapping], path: str | Path) -> Path:
    """Write a PNG with one subject per cohort and scanner group, structures overlaid.

    Args:
        datasets: role (e.g. ``source``) → ``conf/dataset`` entry.
        path: the PNG to write.

    Returns:
        The path written.
    """
    rows = []
    for role, dataset in datasets.items():
        dataset = as_dict(dataset)
        load = transforms.preprocessing(dataset["label_ids"], normalize=False)
        firsts = {}
        for subject in cohort.list_subjects(dataset):
            firsts.setdefault(subject.group, subject)
        for group, subject in firsts.items():
            item = load(subject.as_item())
            label = None if item.get("label") is None else item["label"][0].numpy()
            spacing = item["image"].meta["spacing"]
            title = f"{role} {dataset['name']} {subject.id}" + (f" ({group})" if group else "")
            rows.append((item["image"][0].numpy(), label, spacing, title))
    fig = Figure(figsize=(10, 3.3 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row_axes, (image, label, spacing, title) in zip(axes, rows, strict=True):
        overlay.draw_row(row_axes, image, label, spacing, title)
    overlay.add_legend(fig)
    return figures.save_figure(fig, path)


def write_cohort_preview(cfg: DictConfig) -> dict:
    """Generate (or reuse) the synthetic source and target cohorts, summarise and preview them.

    Writes ``cohorts.json``, ``cohorts.md`` and ``cohorts.png`` to ``cfg.output_dir``.

    Args:
        cfg: the composed ``conf/demo.yaml``.

    Returns:
        ``{"source": summary, "target": summary}``.
    """
    out_dir = Path(cfg.output_dir)
    summaries = {role: summarize_cohort(cfg[role]) for role in ("source", "target")}
    text = "# subseg demo cohorts (synthetic)\n\n" + "\n".join(
        format_summary(s) for s in summaries.values()
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_dir / "cohorts.json") as tmp:
        tmp.write_text(json.dumps(summaries, indent=2))
    with io.atomic_path(out_dir / "cohorts.md") as tmp:
        tmp.write_text(text)
    preview_cohorts({role: cfg[role] for role in ("source", "target")}, out_dir / "cohorts.png")
    print(text)
    written = ", ".join(str(out_dir / f"cohorts.{ext}") for ext in ("md", "json", "png"))
    print(f"written: {written}")
    return summaries
