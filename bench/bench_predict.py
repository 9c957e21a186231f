"""predict.py on one new 1 mm scan, stage by stage, with the peak memory after each stage.

First the whole ``predict.py`` command on the scan in a fresh process with cold caches, for the
end-to-end time and its peak resident memory. Then the same work stage by stage in this process,
each stage's caches cold: loading the model, loading the atlas (the Harvard-Oxford 4-D file),
loading the scan (checks, canonical orientation), N4, atlas registration (the prior warped into
the scan included), intensity standardisation, the network (dense, inside the ROI),
post-processing, writing (segmentation, QC overlay). What the stages leave of the whole
command (``seconds_startup_and_rest``) is mostly the interpreter starting and importing torch,
MONAI, ANTsPy and matplotlib. The model is the demo's source model when ``make demo`` has run
(outputs/demo/runs/source), else an untrained network (the same cost).
"""

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
from common import record

from subseg import atlas, bias, inference, io, overlay, trained_model, transforms
from subseg import contract as contracts
from subseg.lit_module import SegmentationModule
from subseg.run_folder import RunFolder

DEMO_SOURCE = RunFolder("outputs/demo/runs/source")


def _peak_mb(who=resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: kB


def _model(folder: Path) -> Path:
    if DEMO_SOURCE.is_complete():
        return DEMO_SOURCE.checkpoint
    L.seed_everything(0)
    module = SegmentationModule(dropout=0.3, lr=1e-3)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = folder / "untrained.ckpt"
    trainer.save_checkpoint(path)
    return path


def main() -> None:
    from subseg import synth

    params = synth.CohortParams(domain="source", n_subjects=1, seed=7)
    root = synth.ensure_cohort("outputs/bench/predict_subject", params, progress=False)
    scan = root / "images" / "s000.nii.gz"
    work = Path(tempfile.mkdtemp(prefix="subseg-bench-predict-"))
    checkpoint = _model(work)
    preprocess = {**contracts.default_preset("preprocess"), "cache_dir": str(work / "cache")}
    atlas_cfg = {**contracts.default_preset("atlas"), "cache_dir": str(work / "cache")}
    bias.correct(np.ones((8, 8, 8), np.float32), np.eye(4), bias.N4(iterations=(1,)))  # load ITK

    # The whole command first, in a fresh process, caches cold: a child's peak memory counts the
    # parent's resident memory at the moment it starts, so it starts while the parent is small.
    parent_mb = _peak_mb()
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "predict.py",
            f"ckpt={checkpoint}",
            f"input={scan}",
            f"out_dir={work / 'predict'}",
            f"++preprocess.cache_dir={work / 'cache2'}",
            f"++atlas.cache_dir={work / 'cache2'}",
        ],
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    stages, peaks = {}, {}

    def stage(name, function):
        start = time.perf_counter()
        result = function()
        stages[name] = round(time.perf_counter() - start, 2)
        peaks[name] = _peak_mb()
        return result

    net = stage("model", lambda: trained_model.load_network(checkpoint))
    source = stage("atlas", lambda: atlas.load_source(atlas_cfg))  # first load here: cold
    image = stage("load", lambda: io.load_image(scan))
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
            io.save_like(classes, image, work / "s000_seg.nii.gz"),
            overlay.save_overlay(image.data, classes, image.spacing, work / "s000_qc.png"),
        ),
    )

    stage_sum = sum(stages.values())
    record(
        "predict_one_scan_by_stage",
        {
            "compared": f"predict.py on one new 1 mm scan {image.data.shape} "
            f"({'demo source model' if checkpoint == DEMO_SOURCE.checkpoint else 'untrained'}; "
            f"preprocess={preprocess['name']}, atlas={atlas_cfg['name']}, caches cold): "
            "the stages one by one vs the whole command in a fresh process",
            "seconds_by_stage": stages,
            "peak_rss_mb_after_stage": peaks,
            "seconds_stages_sum": round(stage_sum, 2),
            "seconds_whole_command": round(total, 2),
            "seconds_startup_and_rest": round(total - stage_sum, 2),
            "ratio_whole_over_stages": round(total / stage_sum, 2),
            "peak_rss_mb_whole_command": _peak_mb(resource.RUSAGE_CHILDREN),
            "peak_rss_mb_bench_process_when_command_started": parent_mb,
            "roi_voxels": int((prior.regions > 0).sum()),
        },
    )


if __name__ == "__main__":
    main()
