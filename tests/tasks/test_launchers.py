import csv
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import submitit
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from joblib import Parallel, delayed
from joblib.externals.loky import get_reusable_executor
from omegaconf import open_dict

from subseg.core import job_threads, start_method
from subseg.model.network import SubcorticalNet
from subseg.report import report

# Fine-tuning on the session's tiny target cohort (tests/conftest.py) as a plain folder, with a
# tiny recipe. No N4 and no atlas, so its jobs start no ITK process pools: starting a pool in a
# joblib job is tested on its own below.
TARGET = [
    "dataset=synth_tiny_target",
    "~dataset.synth",
    "preprocess=none",
    "atlas=none",
    "sampling.samples_per_subject=300",
    "trainer.max_epochs=1",
    "sampling.batch_size=64",
    "logger=csv",
]


def _compose(name, overrides, hydra=False):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra)


# --- how many threads a job takes ---------------------------------------------------------------


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def _in_sweep(monkeypatch, *overrides, mode=RunMode.MULTIRUN):
    """Make HydraConfig say a job of a sweep is running with these launcher overrides."""
    cfg = _compose("finetune", list(overrides), hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode = mode
    state = HydraConfig.instance()
    monkeypatch.setattr(state, "cfg", None)  # restored after the test: Hydra not initialised
    state.set_config(cfg)


def test_threads_given_are_used(torch_threads, four_cores, monkeypatch):
    _in_sweep(monkeypatch, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2")
    assert job_threads.apply(3) == 3 and torch.get_num_threads() == 3


def test_without_hydra_a_job_takes_every_core(torch_threads, four_cores, monkeypatch):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # a task function called directly
    assert job_threads.apply(0) == 4 and torch.get_num_threads() == 4


def test_parallel_jobs_share_the_cores(torch_threads, four_cores, monkeypatch):
    _in_sweep(monkeypatch, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2")
    assert job_threads.apply(0) == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ("overrides", "mode", "expected"),
    [
        (["hydra/launcher=parallel", "hydra.launcher.n_jobs=8"], RunMode.MULTIRUN, 1),  # never 0
        (["hydra/launcher=joblib"], RunMode.MULTIRUN, 1),  # the plugin's n_jobs=-1: one per core
        (["hydra/launcher=parallel", "hydra.launcher.n_jobs=-2"], RunMode.MULTIRUN, 1),  # 3 jobs
        (["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], RunMode.RUN, 4),  # no -m: 1 job
        ([], RunMode.MULTIRUN, 4),  # the basic launcher: one job at a time
        (["hydra/launcher=slurm"], RunMode.MULTIRUN, 4),  # a SLURM job owns its allocation
    ],
)
def test_share_per_launcher(four_cores, monkeypatch, overrides, mode, expected):
    _in_sweep(monkeypatch, *overrides, mode=mode)
    assert job_threads.share(0) == expected


def test_a_joblib_job_can_start_a_process_pool():
    def job():  # in a loky worker, as a sweep job: a spawn pool, as N4 and registration start
        from concurrent.futures import ProcessPoolExecutor

        reset = start_method.reset_in_loky_worker()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return reset, pool.submit(os.getpid).result()

    # The joblib launcher's backend; without the reset the pool dies (BrokenProcessPool).
    ((reset, pid),) = Parallel(n_jobs=2, backend="loky")(delayed(job)() for _ in range(1))
    get_reusable_executor().shutdown(wait=True)  # joblib keeps its workers for the next call
    assert reset and pid != os.getpid()
    assert not start_method.reset_in_loky_worker()  # not a loky worker: nothing to change


# --- SLURM: settings, and the job script they give (no cluster) ---------------------------------


def test_slurm_settings_reach_the_sbatch_script(tmp_path, monkeypatch):
    cfg = _compose(
        "finetune",
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"paths.output_dir={tmp_path}"],
        hydra=True,
    )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == (
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    ours = {
        "partition": "gpu",  # given on the command line
        "gpus_per_node": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 8,
        "timeout_min": 120,
        "mem_gb": 32,
    }
    assert {key: launcher_cfg[key] for key in ours} == ours
    assert launcher_cfg.submitit_folder == f"{tmp_path}/finetune/slurm/%j"

    # Submit two points through the real launcher and submitit: a fake `srun` (submitit's sign
    # of a SLURM machine) and a fake `sbatch` that keeps the job script; nothing runs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "Submitted batch job 4242"\n'
    )
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COPY", str(tmp_path / "job.sh"))
    monkeypatch.setattr(submitit.Job, "results", lambda self: [None])  # no cluster to wait for
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=print, config=cfg)
    launcher.launch([["target.n_images=1"], ["target.n_images=2"]], initial_job_idx=0)

    script = (tmp_path / "job.sh").read_text().splitlines()
    for flag in (
        "--partition=gpu",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--time=120",
        "--mem=32GB",
        "--array=0-1%2",  # one array job per sweep point
        f"--output={tmp_path}/finetune/slurm/%A_%a/%A_%a_0_log.out",
        f"--error={tmp_path}/finetune/slurm/%A_%a/%A_%a_0_log.err",
    ):
        assert f"#SBATCH {flag}" in script, flag


# --- a local parallel sweep, end to end -------------------------------------------------------


@pytest.fixture
def source_model(tmp_path):
    """An untrained network's weights: a bare source model (what it learnt does not matter)."""
    torch.manual_seed(0)
    path = tmp_path / "source.pt"
    torch.save(SubcorticalNet().state_dict(), path)
    return path


@pytest.mark.slow
def test_parallel_sweep_runs_every_point_and_the_report_reads_them(
    tiny_cohorts, source_model, tmp_path
):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune.py"),
            "-m",
            "hydra/launcher=parallel",
            *TARGET,
            f"dataset.root={tiny_cohorts['target']}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"source_run={source_model}",
            "target.n_images=1,2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr  # not the basic launcher

    sweep = tmp_path / "out" / "finetune"
    runs = {
        f"tl{k}": next(sweep.glob(f"synth_tiny_target_k{k}_d0_source_paper_zscore_*"))
        for k in (1, 2)
    }
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # each of the 2 jobs: half the cores
    for run in runs.values():
        assert json.loads((run / "environment.json").read_text())["torch_threads"] == share

    summary = report.write_report(report.find_runs([sweep]), tmp_path / "report")
    assert set(summary["methods"]) == set(runs)
    with open(tmp_path / "report" / "report.csv", newline="") as f:
        table = {row["structure"]: row for row in csv.DictReader(f)}
    for method, run in runs.items():  # each column: that run's own test Dice
        own = json.loads((run / "summary.json").read_text())
        assert summary["methods"][method]["n_runs"] == 1
        assert float(table["Avg"][method]) == pytest.approx(own["avg"], abs=5e-4)
