"""predict.py on one new 1 mm scan, raw and skull-stripped side by side, stage by stage.

Two scans: a raw 1 mm head (skull, scalp, neck, noise in the air; the synthetic target scanner
at 1 mm) and its skull-stripped twin (the same voxels inside the true brain mask, zero outside,
on the same grid). For each, first the whole ``predict.py`` command in a fresh process with cold
caches, for the end-to-end time and its peak resident memory; then the same work stage by stage
in this process, each stage's caches cold: loading the model, loading the atlas (the
Harvard-Oxford 4-D file), loading the scan (checks, canonical orientation), brain extraction
(deepbet on the raw scan; on the stripped one, recognising it), N4, atlas registration (the
prior warped into the scan included), intensity standardisation, the network (dense, inside the
ROI), post-processing, writing (segmentation, QC overlay). What the stages leave of the whole
command (``seconds_startup_and_rest``) is mostly the interpreter starting and importing torch,
MONAI, ANTsPy and matplotlib. The model is the demo's source model when ``make demo`` has run
(outputs/demo/runs/source), else an untrained network (the same cost).
"""

import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import record

from subseg.core import io, overlay
from subseg.model import inference
from subseg.model.network import SubcorticalNet
from subseg.preprocessing import atlas, bias, brain, transforms
from subseg.preprocessing import contract as contracts
from subseg.runs import trained_model
from subseg.runs.run_folder import RunFolder
from subseg.training.lit_module import SegmentationModule

DEMO_SOURCE = RunFolder("outputs/demo/runs/source")


def _peak_mb(who=resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: kB


def _model(folder: Path) -> Path:
    if DEMO_SOURCE.is_complete():
        return DEMO_SOURCE.checkpoint
    L.seed_everything(0)
    module = SegmentationModule(SubcorticalNet(0.3), partial(torch.optim.Adam, lr=1e-3))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = folder / "untrained.ckpt"
    trainer.save_checkpoint(path)
    return path


ONE_MM_HEAD = {"voxel_mm": (1.0, 1.0, 1.0), "axcodes": "RAS", "partial_volume": 1}


def _scans() -> dict[str, Path]:
    """The raw 1 mm head and its stripped twin (same seed, same grid)."""
    from subseg.data import synth

    scans = {}
    for kind, skull in (("raw", True), ("stripped", False)):
        params = synth.CohortParams(
            domain="target", n_subjects=1, seed=7, extra={**ONE_MM_HEAD, "skull": skull}
        )
        root = synth.ensure_cohort(f"outputs/bench/predict_{kind}", params, progress=False)
        scans[kind] = root / "images" / "t000.nii.gz"
    return scans


def _whole_command(checkpoint: Path, scan: Path, work: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "predict.py",
            f"ckpt={checkpoint}",
            f"input={scan}",
            f"out_dir={work / 'predict'}",
            f"++preprocess.cache_dir={work / 'cache_command'}",
            f"++atlas.cache_dir={work / 'cache_command'}",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return time.perf_counter() - start


def _by_stage(checkpoint: Path, scan: Path, work: Path) -> tuple[dict, dict, object]:
    """Each stage of predict.py on ``scan`` in this process, caches cold."""
    preprocess = {**contracts.default_preset("preprocess"), "cache_dir": str(work / "cache")}
    atlas_cfg = {**contracts.default_preset("atlas"), "cache_dir": str(work / "cache")}
    stages, peaks = {}, {}

    def stage(name, function):
        start = time.perf_counter()
        result = function()
        stages[name] = round(time.perf_counter() - start, 2)
        peaks[name] = _peak_mb()
        return result

    net = stage("model", lambda: trained_model.load_network(checkpoint))
    source = stage("atlas", lambda: atlas.load_source(atlas_cfg))
    image = stage("load", lambda: io.load_image(scan))
    found = stage(
        "extraction", lambda: brain.brain_mask(scan, image.data, image.affine, preprocess)
    )
    stage("n4", lambda: bias.corrected(scan, image.data, image.affine, preprocess))
    prior = stage("registration", lambda: atlas.subject_prior(image, atlas_cfg, source, preprocess))
    standardise = transforms.preprocessing(None, preprocess=preprocess)  # N4 now cached
    volume = stage("standardisation", lambda: standardise({"image": str(scan)})["image"][0].numpy())
    classes, _ = stage("network", lambda: inference.segment(net, volume, prior, False))
    box = prior.box
    classes[box] = stage(
        "post_processing", lambda: inference.postprocess(classes[box], prior.regions > 1)
    )
    stage(
        "writing",
        lambda: (
            io.save_like(classes, image, work / "t000_seg.nii.gz"),
            overlay.save_overlay(
                image.data, classes, image.spacing, work / "t000_qc.png", outline=found.mask
            ),
        ),
    )
    return stages, peaks, {"shape": image.data.shape, "extraction": found.describe()}


def main() -> None:
    scans = _scans()
    work = Path(tempfile.mkdtemp(prefix="subseg-bench-predict-"))
    checkpoint = _model(work)
    bias.correct(np.ones((8, 8, 8), np.float32), np.eye(4), bias.N4(iterations=(1,)))  # load ITK
    # The whole commands first, in fresh processes, caches cold: a child's peak memory counts
    # the parent's resident memory at the moment it starts, so they start while it is small.
    parent_mb = _peak_mb()
    whole = {kind: _whole_command(checkpoint, scan, work / kind) for kind, scan in scans.items()}
    peak_command = _peak_mb(resource.RUSAGE_CHILDREN)
    entry = {}
    for kind, scan in scans.items():
        stages, peaks, about = _by_stage(checkpoint, scan, work / f"{kind}_stages")
        stage_sum = sum(stages.values())
        entry[kind] = {
            "scan": f"{about['shape']}, {about['extraction']}",
            "seconds_by_stage": stages,
            "peak_rss_mb_after_stage": peaks,
            "seconds_stages_sum": round(stage_sum, 2),
            "seconds_whole_command": round(whole[kind], 2),
            "seconds_startup_and_rest": round(whole[kind] - stage_sum, 2),
        }
    record(
        "predict_one_scan_by_stage",
        {
            "compared": "predict.py on one new 1 mm head, raw vs its skull-stripped twin "
            f"({'demo source model' if checkpoint == DEMO_SOURCE.checkpoint else 'untrained'}; "
            "default preprocessing and atlas, caches cold): whole commands in fresh processes, "
            "then the stages one by one",
            **entry,
            "ratio_raw_over_stripped_whole_command": round(whole["raw"] / whole["stripped"], 3),
            "peak_rss_mb_whole_commands": peak_command,
            "peak_rss_mb_bench_process_when_commands_started": parent_mb,
        },
    )


if __name__ == "__main__":
    main()
