"""Label-free adaptation (finetune.py adapt.label_free=…) end to end on the tiny cohorts."""

import json
import shutil

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from subseg.core import io
from subseg.runs.method_keys import method_key
from subseg.tasks import finetune

SOURCE = [
    "dataset=synth_tiny_source",
    "sampling.samples_per_subject=400",
    "trainer.max_epochs=2",
    "volume_dice_every=2",
    "sampling.batch_size=64",
    "logger=csv",
]
TARGET = [
    "dataset=folder",
    "dataset.test_ids=[t002]",
    "sampling.samples_per_subject=300",
    "trainer.max_epochs=2",
    "sampling.batch_size=64",
    "logger=csv",
    "evaluate_source=false",
]


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_cohorts):
    """A tiny source model (with its atlas) and a copy of the tiny target cohort as a plain
    folder (never regenerated: a label deleted stays deleted)."""
    from subseg.tasks import train

    root = tmp_path_factory.mktemp("label_free")
    paths = [f"paths.data_dir={root / 'data'}", f"paths.output_dir={root / 'out'}"]
    source = root / "out" / "source"
    cfg = _compose("train", [*SOURCE, *paths])
    (source / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, source / ".hydra" / "config.yaml")
    train.train(cfg, source)
    cohort = shutil.copytree(tiny_cohorts["target"], root / "cohort")
    (cohort / "synth.json").unlink()
    return root, paths, source, cohort


def _finetune(setting, run_name, *overrides):
    root, paths, source, cohort = setting
    cfg = _compose(
        "finetune", [*TARGET, *paths, f"dataset.root={cohort}", f"source_run={source}", *overrides]
    )
    run = root / "out" / "finetune" / run_name
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return finetune.finetune(cfg, run), run


def _weights(run):
    return torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_self_training_reads_no_label_of_the_pool(setting):
    """Deleting the pool's label files changes nothing: the model, the metrics, the record.

    The guard is off, so the self-trained model is the one compared (on the tiny model it
    could undo the step, and two copies of the source model would prove nothing).
    """
    overrides = ["target.n_images=0", "adapt.label_free=self", "adapt.guard=false"]
    with_labels, run_a = _finetune(setting, "self_a", *overrides)
    for scan in ("t000", "t001"):  # the pool: neither tested nor trained on
        (setting[3] / "labels" / f"{scan}.nii.gz").unlink()
    without, run_b = _finetune(setting, "self_b", *overrides)
    assert with_labels["method"] == without["method"] == "tl0_self"
    a, b, source = _weights(run_a), _weights(run_b), _weights(setting[2])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.fc1.weight"], source["net.fc1.weight"])  # it did train
    assert (run_a / "metrics.csv").read_bytes() == (run_b / "metrics.csv").read_bytes()
    record_a = json.loads((run_a / "transfer.json").read_text())["label_free"]
    record_b = json.loads((run_b / "transfer.json").read_text())["label_free"]
    assert record_a == record_b
    assert record_a["pool"] == ["t000", "t001"]
    step = record_a["steps"][0]
    assert step["step"] == "self-training round 1" and step["voxels"] > 0 and step["kept"]
    assert {"pool_qc_before", "pool_qc_after", "pool_agreement_after"} <= step.keys()
    assert with_labels["label_free"]["pool"] == 2


@pytest.mark.slow
def test_the_guard_keeps_the_source_model_when_the_quality_score_drops(setting, monkeypatch):
    """A self-training round whose model segments worse (here: nothing) is undone."""
    adapt = finetune._adapt

    def sabotaged(*args, **kwargs):
        net, trainer = adapt(*args, **kwargs)
        with torch.no_grad():  # every voxel background: every structure's score falls to 0
            net.classifier.weight.zero_()
            net.classifier.bias.copy_(torch.tensor([50.0] + [0.0] * 14))
        return net, trainer

    monkeypatch.setattr(finetune, "_adapt", sabotaged)
    summary, run = _finetune(setting, "guarded", "target.n_images=0", "adapt.label_free=self")
    source = setting[2]
    kept, given = _weights(run), _weights(source)
    assert all(torch.equal(kept[k], given[k]) for k in given)  # the source model, as is
    step = json.loads((run / "transfer.json").read_text())["label_free"]["steps"][0]
    assert step["kept"] is False and step["pool_qc_after"] < step["pool_qc_before"]
    assert summary["label_free"]["steps"][0]["kept"] is False
    no_tl, _ = _finetune(setting, "no_tl", "target.n_images=0")
    assert summary["avg"] == pytest.approx(no_tl["avg"], abs=1e-9)


def test_label_free_options_are_checked_and_named():
    base = [*TARGET, "dataset.root=/nowhere", "source_run=/nowhere"]
    cfg = _compose("finetune", [*base, "target.n_images=1", "adapt.label_free=self"])
    assert method_key(cfg) == "tl1_self"
    cfg = _compose("finetune", [*base, "target.n_images=0", "adapt.label_free=adabn"])
    assert method_key(cfg) == "tl0_adabn"
    assert method_key(_compose("finetune", [*base, "target.n_images=0"])) == "no_tl"
    cfg = _compose("finetune", [*base, "target.n_images=0", "adapt.label_free=nyul_adabn"])
    assert method_key(cfg) == "tl0_nyul_adabn"
    cfg = _compose(
        "finetune", [*base, "target.n_images=0", "adapt.label_free=nyul", "intensity=nyul"]
    )
    with pytest.raises(io.InputError, match="leave out intensity=nyul"):
        finetune.check_options(cfg)
    for wrong, message in (
        ("adapt.label_free=dann", "choose adabn, self, adabn_self, nyul or nyul_adabn"),
        ("adapt.rounds=0", "adapt.rounds=0"),
        ("adapt.confidence=1.5", "adapt.confidence=1.5"),
    ):
        extra = [] if "label_free" in wrong else ["adapt.label_free=self"]
        cfg = _compose("finetune", [*base, "target.n_images=0", wrong, *extra])
        with pytest.raises(io.InputError, match=message):
            finetune.check_options(cfg)


def test_a_nyul_step_is_refused_where_there_is_nothing_to_choose_from(monkeypatch, tmp_path):
    """A source model that takes Nyúl's input already, or a bare checkpoint (no training images
    to learn Nyúl's scale from): one line, before anything is done."""
    from subseg.preprocessing.contract import InputContract

    base = [*TARGET, "dataset.root=/nowhere", "source_run=/nowhere", "target.n_images=0"]
    cfg = _compose("finetune", [*base, "adapt.label_free=nyul_adabn"])

    class NyulSource:
        path = tmp_path / "source"

        def contract(self):
            return InputContract({"brain": "none"}, {"kind": "none"}, "nyul", [0.0, 1.0])

    checkpoint = tmp_path / "best.ckpt"
    monkeypatch.setattr(finetune, "source_run", lambda cfg: (NyulSource(), {}, checkpoint))
    with pytest.raises(io.InputError, match="already takes Nyúl's input.*label_free=adabn$"):
        finetune._source_and_contract(cfg)
    monkeypatch.setattr(finetune, "source_run", lambda cfg: (None, None, checkpoint))
    monkeypatch.setattr(finetune.trained_model, "read_checkpoint", lambda path: {})
    monkeypatch.setattr(finetune.trained_model, "checkpoint_contract", lambda *args: None)
    with pytest.raises(io.InputError, match="name the source run folder"):
        finetune._source_and_contract(cfg)


def test_nyuls_scale_is_refused_in_one_line_when_the_training_images_are_gone(tmp_path):
    from subseg.preprocessing.contract import InputContract
    from subseg.runs.run_folder import RunFolder
    from subseg.training.preparation import nyul_landmarks

    source = RunFolder(tmp_path / "source")
    source.path.mkdir()
    (source.path / "splits.json").write_text(json.dumps({"train": ["s000", "s001"]}))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "other.nii.gz").write_bytes(b"")
    dataset = {"root": str(tmp_path), "image": "images/{id}.nii.gz", "label": None}
    contract = InputContract({"kind": "none", "brain": "none"}, {"kind": "none"})
    with pytest.raises(io.InputError, match="none of its 2 training images is at"):
        nyul_landmarks(source, {"dataset": dataset}, contract)


def test_the_guard_undoes_a_step_that_lowers_the_score_or_the_atlas_agreement(capsys):
    """Self-training raises the network's confidence by construction: a higher score with a
    lower atlas agreement is undone too. A step that learns nothing from the model's answers
    (AdaBN) is judged by the score alone."""
    from subseg.tasks.label_free import _guarded
    from subseg.training.pseudo_labels import PoolSegmentation

    def pool(confidence, agreement):
        # Without an atlas (agreement NaN) the quality score is the confidence alone.
        qc = confidence if agreement != agreement else (confidence * agreement) ** 0.5
        rows = [{"confidence": confidence, "atlas_agreement": agreement, "qc": qc}] * 14
        return [PoolSegmentation(f"s{i}", None, None, rows) for i in range(3)]

    source = pool(0.62, 0.75)
    for after, keep in (
        (pool(0.64, 0.77), True),  # both rise (AdaBN on a study scanner)
        (pool(0.74, 0.74), False),  # surer, further from the atlas (self-training there)
        (pool(0.60, 0.76), False),  # the score falls
    ):
        record = {}
        assert _guarded("step", source, after, record, self_taught=True) is keep
        assert record["kept"] is keep
        assert record["pool_agreement_after"] == pytest.approx(after[0].agreement)
    assert "undone, the model it started from is kept" in capsys.readouterr().out
    # AdaBN on a study scanner: the score and Dice rose while the agreement fell a little.
    for after, keep in ((pool(0.74, 0.74), True), (pool(0.60, 0.76), False)):
        assert _guarded("AdaBN", source, after, {}) is keep
    record = {}
    assert _guarded("step", source, pool(0.74, 0.74), record, False, self_taught=True) is True
    assert "kept (adapt.guard=false)" in capsys.readouterr().out
    nan = float("nan")  # atlas=none: the score alone decides, for self-training too
    for after, keep in ((pool(0.7, nan), True), (pool(0.5, nan), False)):
        assert _guarded("step", pool(0.6, nan), after, {}, self_taught=True) is keep


@pytest.mark.slow
def test_a_cohort_without_any_label_is_adapted_to(setting, capsys):
    """A user's 200 unlabelled scans: AdaBN adapts to them all, says Dice cannot be measured,
    and the run folder holds a model predict.py reads (its BatchNorm statistics the new ones)."""
    root, paths, source, cohort = setting
    bare = shutil.copytree(cohort, root / "no_labels")
    shutil.rmtree(bare / "labels")
    cfg = _compose(
        "finetune",
        [
            *TARGET,
            *paths,
            f"dataset.root={bare}",
            "dataset.test_ids=null",
            f"source_run={source}",
            "target.n_images=0",
            "adapt.label_free=adabn",
            "adapt.guard=false",
        ],
    )
    run = root / "out" / "finetune" / "no_labels"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    summary = finetune.finetune(cfg, run)
    assert summary["held_out"] == 0 and summary["label_free"]["pool"] == 3
    assert "no labelled scan to measure its Dice on" in capsys.readouterr().out
    kept, given = _weights(run), _weights(source)
    moved = {k for k in given if not torch.equal(kept[k], given[k])}
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert moved and all(k.rsplit(".", 1)[1] in statistics for k in moved)
    assert (run / "complete.json").is_file()


def test_nyul_is_kept_only_when_the_pools_scores_prefer_it(monkeypatch, capsys):
    """``adapt.label_free=nyul``: the source model segments the pool prepared both ways; the
    run takes Nyúl's standardisation (with the source's scale) only when the pool's quality
    score does not fall with it, and otherwise keeps its own."""
    from subseg.preprocessing.contract import InputContract
    from subseg.tasks import label_free
    from subseg.training import pseudo_labels
    from subseg.training.pseudo_labels import PoolSegmentation

    prepared_as = []

    def prepare(pool, contract, source):
        # The real pipeline applies Nyúl's mapping only when the contract carries its scale.
        applied = "nyul" if contract.landmarks is not None else "zscore"
        prepared_as.append(applied)
        return [(s, {"intensity": applied}) for s in pool]

    asked = []

    def landmarks_of(contract):
        asked.append(contract.intensity)
        return scale

    def scores(confidence, agreement):
        qc = (confidence * agreement) ** 0.5
        return [{"confidence": confidence, "atlas_agreement": agreement, "qc": qc}] * 14

    def segment(net, prepared, progress=True):
        wanted = {"zscore": own, "nyul": nyul}[prepared[0][1]["intensity"]]
        return [PoolSegmentation(s, None, None, scores(*wanted)) for s, _ in prepared]

    monkeypatch.setattr(label_free, "prepare_pool", prepare)
    monkeypatch.setattr(pseudo_labels, "segment_pool", segment)
    base = [*TARGET, "dataset.root=/nowhere", "source_run=/nowhere", "target.n_images=0"]
    cfg = _compose("finetune", [*base, "adapt.label_free=nyul_adabn"])
    given = InputContract(preprocess={"brain": "none"}, atlas={"kind": "none"})
    scale = [0.0, 1.0, 2.0]
    own = (0.60, 0.70)
    for nyul, chosen in (
        ((0.62, 0.72), "nyul"),
        ((0.66, 0.67), "nyul"),  # surer, a little further from the atlas: the score decides
        ((0.58, 0.72), "zscore"),
    ):
        contract, prepared, entry, segmentation = label_free.choose_intensity(
            cfg, torch.nn.Identity(), ["s0", "s1"], given, None, landmarks_of
        )
        assert contract.intensity == chosen and entry["kept"] is (chosen == "nyul")
        assert contract.landmarks == (scale if chosen == "nyul" else None)
        assert {item["intensity"] for _, item in prepared} == {chosen}
        expected = {"nyul": nyul, "zscore": own}[chosen]
        assert segmentation[0].agreement == pytest.approx(expected[1])
    assert given.intensity == "zscore" and given.landmarks is None  # the source's, untouched
    assert asked == ["nyul"] * 3  # the scale is asked for the Nyúl contract
    assert "not used, the model's own standardisation is kept" in capsys.readouterr().out
    prepared_as.clear()
    cfg = _compose("finetune", [*base, "adapt.label_free=adabn"])
    contract, _, entry, segmentation = label_free.choose_intensity(
        cfg, torch.nn.Identity(), ["s0"], given, None, landmarks_of
    )
    assert contract is given and entry is None and segmentation is None
    assert prepared_as == ["zscore"]  # no step: the pool prepared once, the model's own way


@pytest.mark.slow
def test_the_intensity_chosen_on_the_pool_is_the_one_the_run_records(setting):
    """The run's input contract (what predict.py reads back) is the standardisation the ``nyul``
    step kept: Nyúl's, with the source's scale, when kept; the model's own when undone."""
    from subseg.runs import trained_model
    from subseg.runs.run_folder import RunFolder

    for guard in ("false", "true"):
        summary, run = _finetune(
            setting,
            f"nyul_guard_{guard}",
            "target.n_images=0",
            "adapt.label_free=nyul",
            f"adapt.guard={guard}",
        )
        step = json.loads((run / "transfer.json").read_text())["label_free"]["steps"][0]
        assert step["step"] == "nyul"
        contract = RunFolder(run).contract()
        assert contract.intensity == ("nyul" if step["kept"] else "zscore")
        assert (contract.landmarks is not None) is step["kept"]
        assert summary["label_free"]["steps"][0]["kept"] is step["kept"]
        # The pool was scored, and the model saved, with the input kept.
        scored = step["pool_qc_after"] if step["kept"] else step["pool_qc_before"]
        assert summary["label_free"]["pool_qc"] == pytest.approx(scored)
        stored = trained_model.read_checkpoint(run / "checkpoints" / "best.ckpt")
        assert trained_model.checkpoint_contract(stored, run).record() == contract.record()
        if guard == "false":
            assert step["kept"] is True
