import json

import pytest
from conftest import REPO, new_module
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from subseg.core import io
from subseg.preprocessing import contract as contracts
from subseg.preprocessing.contract import InputContract
from subseg.runs import trained_model
from subseg.runs.run_folder import RunFolder
from subseg.training import fitting


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _run(tmp_path, name="run", **contract_changes):
    run = RunFolder(tmp_path / name)
    run.config_file.parent.mkdir(parents=True)
    run.config_file.write_text("task: train\n")
    contract = InputContract(
        {**contracts.default_preset("preprocess"), "cache_dir": "/training/machine"},
        {**contracts.default_preset("atlas"), "cache_dir": "/training/machine"},
        **contract_changes,
    )
    run.write_contract(contract)
    fitting.save_untrained(run, new_module())
    run.finish("train", "0" * 16)
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
    assert contracts.check_options(run.contract(), same, run.path).preprocess["kind"] == "n4"
    local = _cfg("predict", "input=x", "++atlas.cache_dir=/elsewhere", "++preprocess.threads=1")
    contract = contracts.check_options(run.contract(), local, run.path)
    assert (
        contract.atlas["cache_dir"] == "/elsewhere" and contract.atlas["kind"] == "harvard_oxford"
    )
    assert contract.preprocess["threads"] == 1
    for option, recorded in (
        ("preprocess=none", "preprocess=n4"),
        ("atlas=none", "atlas=harvard_oxford"),
    ):
        with pytest.raises(io.InputError, match=f"trained with {recorded}; .* other input"):
            contracts.check_options(run.contract(), _cfg("predict", "input=x", option), run.path)
    other = dict(contracts.default_preset("preprocess"), shrink_factor=2)
    with pytest.raises(io.InputError, match="trained with preprocess=n4"):
        contracts.check_options(run.contract(), {"preprocess": other}, run.path)
    # The z-score's statistics are part of the input: another depth is refused, both ways. A
    # record from before the setting existed (no key) is the whole-mask z-score.
    assert "z-score from 5 mm inside the brain" in run.contract().describe()
    whole = dict(contracts.default_preset("preprocess"), zscore_interior_mm=0)
    differs = r"differs in zscore_interior_mm \(model: 5.0, option: 0.0\)"
    with pytest.raises(io.InputError, match=f"trained with preprocess=n4.*{differs}"):
        contracts.check_options(run.contract(), {"preprocess": whole}, run.path)
    older = _run(tmp_path, "older")
    recorded = {k: v for k, v in whole.items() if k != "zscore_interior_mm"}
    older.write_contract(InputContract(recorded, contracts.default_preset("atlas")))
    assert contracts.check_options(older.contract(), {"preprocess": whole}, run.path)
    assert "inside the brain" not in older.contract().describe()
    with pytest.raises(io.InputError, match="trained with preprocess=n4"):
        contracts.check_options(older.contract(), same, run.path)


def test_a_saved_atlas_is_copied_in_and_recorded_without_local_settings(tmp_path):
    saved = tmp_path / "saved_atlas"
    saved.mkdir()
    (saved / "structures.nii.gz").write_bytes(b"atlas")
    atlas = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "atlas" / "source_labels.yaml"))
    atlas.update(path=str(saved), cache_dir="/training/machine")
    run = RunFolder(tmp_path / "run")
    run.write_contract(InputContract(contracts.default_preset("preprocess"), atlas))
    record = json.loads(run.contract_file.read_text())["atlas"]
    assert record["path"] is None and "cache_dir" not in record  # this folder's atlas/
    assert "threads" not in record["registration"]
    assert (run.atlas_dir / "structures.nii.gz").read_bytes() == b"atlas"


def test_model_of_reads_the_run_and_refuses_a_foreign_checkpoint(tmp_path, checkpoint):
    run, other = _run(tmp_path), _run(tmp_path, "other", intensity="nyul", landmarks=[0.0, 1.0])
    model = trained_model.model_of(_cfg("predict", "input=x", f"run_dir={run.path}"))
    assert model.checkpoint == run.checkpoint and model.run.path == run.path
    model = trained_model.model_of(_cfg("predict", "input=x", f"ckpt={other.checkpoint}"))
    assert model.contract.intensity == "nyul"  # a checkpoint inside a run folder brings its own
    mixed = _cfg("predict", "input=x", f"run_dir={run.path}", f"ckpt={other.checkpoint}")
    with pytest.raises(io.InputError, match="not a checkpoint of run_dir="):
        trained_model.model_of(mixed)
    # A checkpoint made elsewhere (no contract inside) takes the options, or the defaults.
    model = trained_model.model_of(_cfg("predict", "input=x", f"ckpt={checkpoint}", "atlas=none"))
    assert model.run is None and model.contract.atlas["kind"] == "none"
    assert model.contract.preprocess["kind"] == "n4"
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"weights")
    with pytest.raises(io.InputError, match="garbage.ckpt: not a readable subseg checkpoint"):
        trained_model.model_of(_cfg("predict", "input=x", f"ckpt={garbage}"))
    (run.contract_file).unlink()
    with pytest.raises(io.InputError, match="no preprocessing.json"):
        trained_model.model_of(_cfg("predict", "input=x", f"run_dir={run.path}"))


def test_a_run_without_its_marker_is_refused_by_every_reader(tmp_path):
    run = _run(tmp_path)
    run.marker_file.unlink()  # killed before it finished: every file there but the marker
    for cfg in (
        _cfg("predict", "input=x", f"run_dir={run.path}"),
        _cfg("predict", "input=x", f"ckpt={run.checkpoint}"),
    ):
        with pytest.raises(io.InputError, match="not a complete run .no complete.json"):
            trained_model.model_of(cfg)
    with pytest.raises(io.InputError, match="not a complete run"):
        trained_model.source_run(_cfg("finetune", f"source_run={run.path}"))
    with pytest.raises(io.InputError, match="not a complete run"):
        run.summary()


def test_starting_a_run_clears_its_marker_and_old_results_first(tmp_path):
    run = _run(tmp_path)
    run.publish_results([{"subject": "s"}], ["subject"], {"avg": 0.5})
    run.source_test.publish_results([{"subject": "s"}], ["subject"], {"avg": 0.4})
    run.last_checkpoint.write_bytes(b"last")
    assert run.is_complete()
    run.start(resume=True)  # a continued run keeps its checkpoints and splits, not its results
    assert not run.is_complete() and not run.summary_file.exists()
    assert not run.metrics_file.exists() and not run.source_test.path.exists()
    assert run.last_checkpoint.is_file() and run.contract_file.is_file()
    run.start()
    assert not run.checkpoints_dir.exists() and not run.contract_file.exists()
    assert run.config_file.is_file()  # Hydra's record of this run stays


def test_the_config_hash_ignores_where_and_how_fast(tmp_path):
    from subseg.runs.run_folder import config_hash

    base = _cfg("finetune", "source_run=x", "preprocess=n4", "atlas=harvard_oxford")
    same = _cfg(
        "finetune",
        "source_run=x",
        "preprocess=n4",
        "atlas=harvard_oxford",
        "resume=true",
        "num_workers=2",
        "logger=csv",
        "++atlas.cache_dir=/elsewhere",
        "++atlas.registration.threads=7",
        "++preprocess.threads=3",
    )
    assert config_hash(base) == config_hash(same)
    for change in (
        "seed=1",
        "model.optimizer.lr=0.5",
        "target.n_images=2",
        "dataset=synth_tiny_source",
    ):
        changed = _cfg("finetune", "source_run=x", "preprocess=n4", "atlas=harvard_oxford", change)
        assert config_hash(changed) != config_hash(base), change
    assert config_hash(base, {"source": "a"}) != config_hash(base, {"source": "b"})


def test_resume_refuses_a_run_started_with_another_configuration(tmp_path):
    run = RunFolder(tmp_path / "run")
    first = _cfg("finetune", "source_run=x", "resume=true")
    digest = run.begin(first)
    assert run.read_json(run.started_file)["config_hash"] == digest
    run.last_checkpoint.parent.mkdir()
    run.last_checkpoint.write_bytes(b"killed here")
    assert run.begin(first) == digest and run.last_checkpoint.is_file()  # kept to resume from
    with pytest.raises(io.InputError, match="was started with another configuration"):
        run.begin(_cfg("finetune", "source_run=x", "resume=true", "model.optimizer.lr=0.5"))
    assert run.last_checkpoint.is_file()  # refused before anything was cleared
    run.begin(_cfg("finetune", "source_run=x", "model.optimizer.lr=0.5"))  # afresh: no resume
    assert not run.last_checkpoint.exists()


def test_a_complete_run_keeps_the_config_of_its_results(tmp_path):
    run = _run(tmp_path)
    run.finish("train", "0" * 16, {"task": "train", "seed": 3})
    run.config_file.write_text("task: train\nseed: 99\n")  # Hydra, for a command then refused
    assert run.config()["seed"] == 3
