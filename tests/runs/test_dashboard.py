from conftest import REPO
from hydra import compose, initialize_config_dir

from subseg.runs import dashboard
from subseg.runs.run_folder import RunFolder


def _finetune(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("finetune", overrides=["source_run=/nowhere", *overrides])


def test_a_finetuning_run_describes_itself_for_a_sweep(tmp_path):
    cfg = _finetune("target.n_images=3", "target.draw=1", "freeze=bn_only", "preprocess=n4")
    run = RunFolder(tmp_path)
    config = dashboard.describe(cfg, run)
    assert config["method"] == "tl3_bn_only" and config["k"] == 3 and config["draw"] == 1
    assert config["freeze"] == "bn_only" and config["preprocessing"] == "n4"
    assert config["config"]["target"]["n_images"] == 3  # the resolved config travels whole

    chosen = dashboard.wandb_defaults(cfg, run, {})
    assert chosen["group"] == "finetune-synth_target"
    assert {"finetune", "tl3_bn_only", "k=3", "bn_only", "zscore", "n4"} <= set(chosen["tags"])
    assert chosen["config"] == config
    given = dashboard.wandb_defaults(cfg, run, {"group": "mine", "tags": ["a"]})
    assert "group" not in given and "tags" not in given  # the user's own are kept


def test_a_finetuning_run_takes_its_preprocessing_from_its_contract(tmp_path):
    run = RunFolder(tmp_path)
    run.write_json(run.contract_file, {"preprocess": {"name": "none", "kind": "none"}})
    assert dashboard.describe(_finetune(), run)["preprocessing"] == "none"


def test_the_summary_goes_to_wandb_loggers_only():
    class WandbLogger:  # what publish_summary looks for, without a W&B run
        def __init__(self):
            self.experiment = type("Run", (), {"summary": {}})()

    class CSVLogger:
        pass

    wandb, other = WandbLogger(), CSVLogger()
    per = {"left_thalamus": {"mean": 0.9}, "right_thalamus": {"mean": 0.8}}
    dashboard.publish_summary([wandb, other], {"avg": 0.85, "wavg": 0.86, "per_structure": per})
    assert wandb.experiment.summary == {
        "test/avg": 0.85,
        "test/wavg": 0.86,
        "test/dice/left_thalamus": 0.9,
        "test/dice/right_thalamus": 0.8,
    }
