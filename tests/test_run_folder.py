import json

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from subseg import io, run_folder, tasks
from subseg.run_folder import InputContract, RunFolder


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _run(tmp_path, name="run", **contract_changes):
    run = RunFolder(tmp_path / name)
    run.config_file.parent.mkdir(parents=True)
    run.config_file.write_text("task: train\n")
    run.checkpoints_dir.mkdir()
    run.checkpoint.write_bytes(b"weights")
    contract = InputContract(
        {**run_folder.default_preset("preprocess"), "cache_dir": "/training/machine"},
        {**run_folder.default_preset("atlas"), "cache_dir": "/training/machine"},
        **contract_changes,
    )
    run.write_contract(contract)
    return run


def test_a_contract_records_what_not_where(tmp_path):
    run = _run(tmp_path, intensity="nyul", landmarks=[0.0, 1.0])
    record = json.loads(run.contract_file.read_text())
    assert "cache_dir" not in record["preprocess"] and "cache_dir" not in record["atlas"]
    assert "threads" not in record["atlas"]["registration"]
    contract = run.contract()
    assert (contract.intensity, contract.landmarks) == ("nyul", [0.0, 1.0])
    assert contract.preprocess["kind"] == "n4" and contract.atlas["kind"] == "harvard_oxford"


def test_options_are_checked_against_the_runs_record(tmp_path):
    run = _run(tmp_path)
    same = _cfg("predict", "input=x", "preprocess=n4", "atlas=harvard_oxford")
    assert run_folder.check_options(run.contract(), same, run.path).preprocess["kind"] == "n4"
    local = _cfg("predict", "input=x", "++atlas.cache_dir=/elsewhere", "++preprocess.threads=1")
    contract = run_folder.check_options(run.contract(), local, run.path)
    assert (
        contract.atlas["cache_dir"] == "/elsewhere" and contract.atlas["kind"] == "harvard_oxford"
    )
    assert contract.preprocess["threads"] == 1
    for option, recorded in (
        ("preprocess=none", "preprocess=n4"),
        ("atlas=none", "atlas=harvard_oxford"),
    ):
        with pytest.raises(io.InputError, match=f"trained with {recorded}; .* other input"):
            run_folder.check_options(run.contract(), _cfg("predict", "input=x", option), run.path)
    other = dict(run_folder.default_preset("preprocess"), shrink_factor=2)
    with pytest.raises(io.InputError, match="trained with preprocess=n4"):
        run_folder.check_options(run.contract(), {"preprocess": other}, run.path)


def test_model_of_reads_the_run_and_refuses_a_foreign_checkpoint(tmp_path):
    run, other = _run(tmp_path), _run(tmp_path, "other", intensity="nyul", landmarks=[0.0, 1.0])
    checkpoint, contract, found = tasks.model_of(_cfg("predict", "input=x", f"run_dir={run.path}"))
    assert checkpoint == run.checkpoint and found.path == run.path
    _, contract, _ = tasks.model_of(_cfg("predict", "input=x", f"ckpt={other.checkpoint}"))
    assert contract.intensity == "nyul"  # a checkpoint inside a run folder brings its contract
    mixed = _cfg("predict", "input=x", f"run_dir={run.path}", f"ckpt={other.checkpoint}")
    with pytest.raises(io.InputError, match="not a checkpoint of run_dir="):
        tasks.model_of(mixed)
    bare = tmp_path / "bare.ckpt"
    bare.write_bytes(b"weights")
    _, contract, found = tasks.model_of(_cfg("predict", "input=x", f"ckpt={bare}", "atlas=none"))
    assert (
        found is None and contract.atlas["kind"] == "none" and contract.preprocess["kind"] == "n4"
    )
    (run.contract_file).unlink()
    with pytest.raises(io.InputError, match="no preprocessing.json"):
        tasks.model_of(_cfg("predict", "input=x", f"run_dir={run.path}"))
