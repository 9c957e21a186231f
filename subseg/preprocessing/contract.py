"""The input contract of a model: how a scan becomes the network's input.

A network is only right on input prepared the way it was trained: the same brain extraction
(:mod:`subseg.preprocessing.brain`), the same bias-field correction, the same intensity
standardisation (and Nyúl landmarks), the same atlas. Every training and fine-tuning run records
that once, in ``preprocessing.json``, and every use of the model (fine-tuning from it, evaluating
it, predicting with it) builds its input from that record through :meth:`InputContract.pipeline` —
never from loose command-line options. An option that contradicts the record is a one-line error.

The contract is stored in the model's run folder (:class:`subseg.runs.run_folder.RunFolder`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from subseg import CONF_DIR  # default presets are read from the shipped config tree
from subseg.core import io
from subseg.core.config_identity import LOCAL_KEYS  # where or how fast, never what: not recorded
from subseg.preprocessing import atlas, bias, brain, transforms

DEFAULTS = {"preprocess": "n4", "atlas": "harvard_oxford"}
"""Preset used where neither a run folder nor the command line says (a bare checkpoint)."""


def as_dict(config) -> dict | None:
    """A plain dict of a (DictConfig or mapping) config entry; ``None`` stays ``None``."""
    if config is None:
        return None
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def default_preset(group: str) -> dict:
    """The default ``conf/<group>`` preset (:data:`DEFAULTS`) as a dict."""
    return as_dict(OmegaConf.load(CONF_DIR / group / f"{DEFAULTS[group]}.yaml"))


@dataclass
class InputContract:
    """How a model's input is prepared: everything between the scan file and the network.

    Attributes:
        preprocess: the ``conf/preprocess`` entry (brain extraction, bias-field correction).
        atlas: the ``conf/atlas`` entry; for ``source_labels`` its ``path`` is the saved atlas.
        intensity: ``zscore`` or ``nyul``.
        landmarks: the Nyúl standard scale (``intensity=nyul`` only).
    """

    preprocess: dict
    atlas: dict
    intensity: str = "zscore"
    landmarks: list[float] | None = field(default=None)

    @classmethod
    def from_record(cls, record: Mapping) -> InputContract:
        """The contract a :meth:`record` (``preprocessing.json``) describes."""
        return cls(
            preprocess=dict(record["preprocess"]),
            atlas=dict(record["atlas"]),
            intensity=record.get("intensity", "zscore"),
            landmarks=record.get("landmarks"),
        )

    def pipeline(self, protocol=None, source: atlas.AtlasSource | None = None) -> object:
        """The exact MONAI pipeline this model's input goes through, atlas prior included.

        Args:
            protocol: the cohort's label protocol (``None`` for unlabelled scans).
            source: the loaded atlas (default: loaded from :attr:`atlas`).

        Returns:
            A :class:`subseg.preprocessing.transforms.Pipeline` taking ``{"image": path, "label":
            …}`` and giving the standardised ``image``, the mapped ``label`` and the ``prior``.
        """
        source = self.load_atlas() if source is None else source
        return transforms.Pipeline(
            [
                *self.intensities(protocol).transforms,
                transforms.AtlasPriord(self.atlas, source, self.preprocess),
            ]
        )

    def intensities(self, protocol=None, landmarks: bool = True) -> transforms.Pipeline:
        """The intensity half of :meth:`pipeline` (no prior): load → N4 → z-score → Nyúl."""
        return transforms.preprocessing(
            protocol, self.landmarks if landmarks else None, preprocess=self.preprocess
        )

    def load_atlas(self) -> atlas.AtlasSource | None:
        """The atlas source (``None`` for ``atlas=none``)."""
        return atlas.load_source(self.atlas)

    def record(self) -> dict:
        """The JSON form written to ``preprocessing.json``.

        What the model's input is, without the settings of the machine that trained it (cache
        folders, threads).
        """
        return {
            "preprocess": _without_local(self.preprocess),
            "atlas": _without_local(self.atlas),
            "intensity": self.intensity,
            "landmarks": self.landmarks,
        }

    def describe(self) -> str:
        """One line for logs: ``brain=auto preprocess=n4 atlas=harvard_oxford intensity=zscore``."""
        interior_mm = transforms.zscore_interior_mm(self.preprocess)
        return (
            f"brain={brain.Extraction.from_config(self.preprocess).method} "
            f"preprocess={self.preprocess.get('name')} atlas={self.atlas.get('name')} "
            f"intensity={self.intensity}"
            + (f" (z-score from {interior_mm:g} mm inside the brain)" if interior_mm else "")
        )


def _without_local(preset: Mapping) -> dict:
    out = {k: v for k, v in preset.items() if k not in LOCAL_KEYS}
    if isinstance(out.get("registration"), Mapping):
        out["registration"] = {k: v for k, v in out["registration"].items() if k != "threads"}
    return out


def _meaning(preset: Mapping, group: str):
    """What of a preset changes the model's input (local settings left out)."""
    if group == "preprocess":  # the brain block may differ: see with_brain
        settings = bias.N4.from_config(preset)
        return {
            "n4": None if settings is None else settings.record(),
            "zscore_interior_mm": transforms.zscore_interior_mm(preset),
        }
    registration = {k: v for k, v in (preset.get("registration") or {}).items() if k != "threads"}
    keys = ("kind", "roi_distance", "mask_distance", "smoothing_mm", "template", "probabilities")
    return {**{k: preset.get(k) for k in keys}, "registration": registration}


def _differences(recorded: Mapping, given: Mapping, group: str) -> str:
    """Which settings of two same-named presets differ, for an error message (else '')."""
    if recorded.get("name") != given.get("name"):
        return ""
    model, option = _meaning(recorded, group), _meaning(given, group)
    keys = [k for k in model if model[k] != option.get(k)]
    return "; it differs in " + ", ".join(
        f"{k} (model: {model[k]}, option: {option.get(k)})" for k in keys
    )


def with_brain(preprocess: Mapping, cfg) -> dict:
    """``preprocess`` with the task's ``brain=`` option (when set) as its extraction method.

    Unlike N4 or the atlas, the extraction method may differ from a model's own: every method
    gives the network a brain (zero outside it), the model never saw the skull either way, and
    a scan one extractor gets wrong (an infant, a lesion, a cropped field of view) must be
    segmentable with another. What each scan went through is written beside its output.

    Raises:
        io.InputError: an unknown method.
    """
    preprocess = dict(preprocess)
    chosen = cfg.get("brain") if cfg is not None else None
    if chosen is not None:
        block = preprocess.get("brain")
        block = {"method": block} if isinstance(block, str) else dict(block or {})
        preprocess["brain"] = {**block, "method": str(chosen)}
    brain.Extraction.from_config(preprocess)  # a one-line error on an unknown method
    return preprocess


def check_options(contract: InputContract, cfg, where: Path | str) -> InputContract:
    """Refuse ``preprocess=`` / ``atlas=`` options that contradict a model's recorded contract.

    Options left unset (``null``) take the model's; an option equal to the model's is fine.
    Local settings (``cache_dir``, ``threads``) given on the command line are applied, and so is
    ``brain=`` (:func:`with_brain`).

    Returns:
        ``contract``, with the local settings applied.

    Raises:
        io.InputError: an option differs from what the model was trained with.
    """
    for group in ("preprocess", "atlas"):
        recorded = getattr(contract, group)
        given = as_dict(cfg.get(group)) if cfg is not None else None
        if not given:
            continue
        if "kind" in given and _meaning(given, group) != _meaning(recorded, group):
            raise io.InputError(
                f"{where}: the model was trained with {group}={recorded.get('name')}; "
                f"{group}={given.get('name')} would feed it other input (drop the option: "
                f"the run's own is used){_differences(recorded, given, group)}"
            )
        local = {k: given[k] for k in LOCAL_KEYS if given.get(k) is not None}
        threads = (given.get("registration") or {}).get("threads")
        if threads is not None and "registration" in recorded:
            local["registration"] = {**recorded["registration"], "threads": threads}
        setattr(contract, group, {**recorded, **local})
    contract.preprocess = with_brain(contract.preprocess, cfg)
    return contract


def contract_from_options(cfg, why: str) -> InputContract:
    """A contract from command-line options alone (a bare checkpoint or a scratch run).

    Unset groups take :data:`DEFAULTS` (with local settings such as ``cache_dir`` kept), with a
    note on stderr saying so.
    """
    chosen = {}
    for group in ("preprocess", "atlas"):
        given = as_dict(cfg.get(group)) or {}
        if "kind" not in given:  # unset, or only local settings (+atlas.cache_dir=…)
            given = {**default_preset(group), **given}
            if why:
                print(f"subseg: {why}: using {group}={given['name']}", file=sys.stderr)
        chosen[group] = given
    return InputContract(with_brain(chosen["preprocess"], cfg), chosen["atlas"])
