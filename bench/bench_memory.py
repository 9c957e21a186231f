"""Peak resident memory of training on the 15 source subjects and of predicting a 256³ scan.

Each is the real command in a fresh process, started from this small bench process (a child's
peak counts the memory of the process that starts it, so this one imports neither torch nor
subseg's training code):

- **training**: ``train.py`` on the synthetic source cohort's training split (15 subjects: 12
  sampled for training, 3 held out whole for validation, exactly the default split) with the
  default recipe (3,000 samples per subject), then its test evaluation, here on one subject
  (s015) instead of the default 5 to save a minute. The epoch is cut to ``TRAIN_BATCHES``
  training and ``VAL_BATCHES`` validation batches: memory peaks once the subjects are loaded
  and their samples pooled, and during the whole-volume validation and test segmentations, not
  later in the epoch. The bias corrections and atlas priors come from the cohort's caches (made
  by ``bench_source.py`` or any earlier run).
- **predicting**: ``predict.py`` with that run's model on one 1 mm scan of 256×256×256 voxels
  (a synthetic source subject zero-padded to 256³, the size of a FreeSurfer-conformed scan),
  its N4 and atlas caches cold (fresh cache folders).

Figures: ``peak_rss_mb`` is ``ru_maxrss`` of the command (``os.wait4``: the largest single
process among it and the children it waited for); ``peak_tree_rss_mb`` is the largest sum of
the resident memory of the command and all its descendants, sampled every 0.1 s (what the
machine must hold at once; worker processes, when any, count together). Goals: training under
8 GiB, prediction under 4 GiB. ``timeline_seconds_mb`` shows when the memory is held.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import record

TRAIN_BATCHES = 30
VAL_BATCHES = 10
TIMELINE_STEP = 5.0  # seconds between the timeline's points
# The training split of conf/dataset/synth_source.yaml (15 subjects) and one test subject: with
# ``ids`` and ``test_ids`` so, make_splits draws exactly the default validation subjects.
TRAIN_IDS = [f"s{i:03d}" for i in range(16)]
RUN_DIR = Path("outputs/bench/runs/memory_train")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def _measure(command: list[str], log: Path) -> dict:
    """Run ``command``; its wall time, ``ru_maxrss`` and sampled peak of its process tree."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        peak, timeline, done = [0, 0.0], [], threading.Event()

        def sample():
            while not done.is_set():
                rss, now = _tree_rss(child.pid), time.perf_counter() - start
                if rss > peak[0]:
                    peak[:] = [rss, now]
                if not timeline or now - timeline[-1][0] >= TIMELINE_STEP:
                    timeline.append((round(now, 1), round(rss / 2**20)))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(command)} failed; its output ({log}):\n{tail}")
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux: kB
        "peak_tree_rss_mb": round(peak[0] / 2**20),
        "seconds_at_peak": round(peak[1], 1),
        "timeline_seconds_mb": timeline,
    }


def _scan_256(folder: Path) -> tuple[Path, tuple]:
    """A 1 mm synthetic source subject zero-padded to 256³, centred, in the same world space."""
    from subseg.data import synth

    params = synth.CohortParams(domain="source", n_subjects=1, seed=7)
    root = synth.ensure_cohort("outputs/bench/predict_subject", params, progress=False)
    image = nib.load(root / "images" / "s000.nii.gz")
    data = np.asarray(image.dataobj)
    before = [(256 - n) // 2 for n in data.shape]
    padded = np.pad(data, [(b, 256 - n - b) for b, n in zip(before, data.shape, strict=True)])
    affine = image.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array(before, float)  # voxel 0 moves by -before
    path = folder / "s000_256.nii.gz"
    out = nib.Nifti1Image(padded, affine, image.header)
    out.set_qform(affine)
    out.set_sform(affine)
    nib.save(out, path)
    return path, data.shape


def main() -> None:
    logs = Path("outputs/bench/logs")
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    train = _measure(
        [
            sys.executable,
            "train.py",
            "logger=csv",
            "name=bench_memory",
            f"hydra.run.dir={RUN_DIR}",
            f"dataset.ids=[{','.join(TRAIN_IDS)}]",
            f"dataset.test_ids=[{TRAIN_IDS[-1]}]",
            "trainer.max_epochs=1",
            f"+trainer.limit_train_batches={TRAIN_BATCHES}",
            f"+trainer.limit_val_batches={VAL_BATCHES}",
            "volume_dice_every=1",
        ],
        logs / "memory_train.log",
    )
    work = Path(tempfile.mkdtemp(prefix="subseg-bench-memory-"))
    try:
        scan, original_shape = _scan_256(work)
        predict = _measure(
            [
                sys.executable,
                "predict.py",
                f"run_dir={RUN_DIR}",
                f"input={scan}",
                f"out_dir={work / 'predict'}",
                f"++preprocess.cache_dir={work / 'cache'}",
                f"++atlas.cache_dir={work / 'cache'}",
            ],
            logs / "memory_predict.log",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record(
        "peak_memory",
        {
            "compared": "peak resident memory of train.py on the synthetic source training split "
            f"(15 subjects, default recipe, epoch cut to {TRAIN_BATCHES} batches and "
            f"{VAL_BATCHES} validation batches, whole-volume validation on its 3 validation "
            f"subjects, then its test on subject {TRAIN_IDS[-1]}; N4 and priors cached) and of "
            "predict.py on one 256³ 1 mm scan (a "
            f"{'×'.join(map(str, original_shape))} subject zero-padded; caches cold), each a "
            "fresh process; goals: 8 GiB and 4 GiB",
            "train_15_subjects": train,
            "predict_256_cubed": predict,
            "goal_train_mb": 8 * 1024,
            "goal_predict_mb": 4 * 1024,
            "bench_process_rss_mb": round(_tree_rss(os.getpid()) / 2**20),
            "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        },
    )


if __name__ == "__main__":
    main()
