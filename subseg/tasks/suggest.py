"""Which scans to label first: rank a cohort's scans by how well they represent the rest.

Fine-tuning on k labelled scans adapts the fully-connected layers to what the frozen conv
layers see on the new scanner. A scan whose conv features look like most other scans' teaches
the layers what they will meet most often; an outlier teaches them one scan. So each scan is
described in the source network's frozen-feature space — the mean conv features (the 1620
values the fully-connected layers read) over each structure's expected region (the registered
atlas prior's most probable class: no label is read, and the segmentation's own errors do not
move it) — and the scans are ranked by greedy coverage (k-medoids' facility-location objective):
the first is the medoid, the scan closest on average to all others; each next one is the scan
that most lowers the cohort's mean distance to its nearest pick. Features are standardised per
dimension across the cohort first, so no channel dominates by its scale alone.

The evidence behind this choice is in ``docs/engineering.md`` ("Which scans to label"): TL-1 on
every candidate of the demo's target and of four more synthetic scanners
(``studies/adaptation.py``). On those four the medoid's TL-1 reached the 82nd percentile on
average (86 on A and B again with another source model; on the demo's target only the 8th, then
the 0th: the worst of 13), while picking the scan the source model scores lowest (its weakness)
or the farthest one reached the 36th and 43rd: the scans the source handles badly are often
outliers whose label teaches the fully-connected layers about one scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.spatial.distance import cdist

from subseg.core import io
from subseg.core.figures import save_figure
from subseg.core.labels import NUM_CLASSES
from subseg.model import dense
from subseg.model.network import SubcorticalNet
from subseg.preprocessing.atlas import Prior

COLUMNS = ("rank", "scan", "score", "why")


@torch.no_grad()
def scan_features(net: SubcorticalNet, volume: np.ndarray, prior: Prior) -> np.ndarray:
    """A scan's place in the frozen-feature space: per-structure mean conv features.

    Args:
        net: the source network, in eval mode.
        volume: X×Y×Z standardised T1 (canonical), as the network takes it.
        prior: the scan's registered atlas prior.

    Returns:
        A flat vector of 14 × 1620 means (structure-major); zero for a structure the prior
        never makes the most probable class. Without an atlas (``atlas=none``) the whole ROI's
        mean fills the first structure's place.
    """
    expected = prior.argmax()
    if not expected.any():  # atlas=none: no structure regions; the brain's mean stands in
        expected = prior.roi.astype(np.uint8)
    inside = expected > 0
    features = dense.dense_conv_features(
        net, torch.from_numpy(np.asarray(volume, np.float32)), torch.from_numpy(inside)
    )
    # dense_conv_features orders its rows as torch.nonzero(inside): numpy's C order too.
    classes = torch.from_numpy(expected[inside].astype(np.int64))
    sums = torch.zeros((NUM_CLASSES, features.shape[1]), dtype=torch.float64)
    sums.index_add_(0, classes, features.double())
    counts = torch.bincount(classes, minlength=NUM_CLASSES).clamp(min=1)
    return (sums / counts[:, None])[1:].flatten().numpy()


def features_of(net: SubcorticalNet, contract, images: Mapping[str, str | Path]) -> dict:
    """Every scan's :func:`scan_features`, prepared exactly as the model's own input.

    The atlas is registered to the scans not yet in the cache first, one process per core;
    ``predict.py`` on the same scans later reuses that work.

    Args:
        net: the source network, in eval mode.
        contract: its :class:`subseg.preprocessing.contract.InputContract`.
        images: scan id → T1 file.

    Returns:
        scan id → feature vector.
    """
    from rich.progress import track

    from subseg.preprocessing import atlas

    source = contract.load_atlas()
    atlas.ensure_priors(
        list(images.values()), contract.atlas, source, None, True, contract.preprocess
    )
    prepare = contract.pipeline(None, source)
    out = {}
    for scan, path in track(list(images.items()), description="frozen features"):
        item = prepare({"image": str(path)})  # the image only: no label is read
        out[scan] = scan_features(net, item["image"][0].numpy(), item["prior"])
    return out


def distances(features: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Scan ids (sorted) and their pairwise distances in the standardised feature space.

    Each dimension is standardised across the scans (constant ones dropped); the Euclidean
    distance is divided by √dimensions, so a distance of about √2 is two unrelated scans.
    """
    ids = sorted(features)
    x = np.stack([np.asarray(features[i], np.float64) for i in ids])
    spread = x.std(axis=0)
    keep = spread > 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0)))
    z = (x[:, keep] - x[:, keep].mean(axis=0)) / spread[keep] if keep.any() else x[:, :0]
    return ids, cdist(z, z) / np.sqrt(max(z.shape[1], 1))


def coverage_ranking(ids: list[str], d: np.ndarray) -> list[dict]:
    """Rank every scan by greedy coverage of the others.

    Args:
        ids: scan ids, in the order of ``d``'s rows.
        d: n×n distances.

    Returns:
        ``suggest.csv`` rows, best first: ``rank`` (1 = label first), ``scan``, ``score`` (the
        cohort's mean distance to its nearest pick once this scan is labelled too: lower is
        better covered) and ``why``. Ties go to the scan listed first (sorted ids).
    """
    n = len(ids)
    nearest = np.full(n, np.inf)
    left = list(range(n))
    rows = []
    for rank in range(1, n + 1):
        costs = [float(np.minimum(nearest, d[c]).mean()) for c in left]
        best = left[int(np.argmin(costs))]
        gained = np.flatnonzero(d[best] < nearest)
        before = float(nearest.mean()) if rank > 1 else None
        nearest = np.minimum(nearest, d[best])
        left.remove(best)
        if rank == 1:
            others = float(d[best].sum() / max(n - 1, 1))
            why = (
                f"medoid: the most typical scan (mean distance to the other {n - 1} scans "
                f"{others:.3f})"
            )
        else:
            closer = [ids[i] for i in gained if i != best]
            earlier = "pick 1" if rank == 2 else f"picks 1–{rank - 1}"
            shown = ", ".join(closer[:5]) + (" …" if len(closer) > 5 else "")
            why = (
                f"covers what {earlier} miss{'es' if rank == 2 else ''}: nearest pick for itself"
                + (f" and {len(closer)} more ({shown})" if closer else "")
                + f"; cohort mean distance {before:.3f} → {float(nearest.mean()):.3f}"
            )
        rows.append({"rank": rank, "scan": ids[best], "score": float(nearest.mean()), "why": why})
    return rows


def embedding_2d(d: np.ndarray) -> np.ndarray:
    """n×2 coordinates whose distances approximate ``d`` (classical multidimensional scaling).

    By hand: scikit-learn's MDS is iterative (SMACOF) and not a dependency; the classical form
    is one eigen-decomposition.
    """
    n = len(d)
    centring = np.eye(n) - 1.0 / n
    gram = -0.5 * centring @ (d**2) @ centring
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:2]
    coords = vectors[:, order] * np.sqrt(np.maximum(values[order], 0.0))
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords


def plot(ids: list[str], d: np.ndarray, rows: list[dict], n: int, path: str | Path) -> Path:
    """The cohort in the frozen-feature space (2-D scaling), the ``n`` suggested scans marked."""
    coords = embedding_2d(d)
    rank = {row["scan"]: row["rank"] for row in rows}
    picked = np.array([rank[i] <= n for i in ids])
    fig = Figure(figsize=(6.4, 5.0))
    ax = fig.subplots()
    ax.scatter(*coords[~picked].T, color="tab:grey", label="other scans")
    ax.scatter(*coords[picked].T, color="tab:red", s=90, marker="*", label=f"label first ({n})")
    for (x, y), scan in zip(coords, ids, strict=True):
        text = f"{scan} (#{rank[scan]})" if rank[scan] <= n else scan
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(
        xlabel="scaling axis 1",
        ylabel="scaling axis 2",
        title="Scans in the source network's frozen-feature space",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write(rows: list[dict], ids: list[str], d: np.ndarray, n: int, out_dir: str | Path) -> Path:
    """Write ``suggest.csv`` and ``suggest.png`` to ``out_dir``; the CSV's path."""
    out_dir = io.ensure_writable(out_dir)
    csv_path = io.write_csv(rows, list(COLUMNS), Path(out_dir) / "suggest.csv")
    plot(ids, d, rows, n, Path(out_dir) / "suggest.png")
    return csv_path


def suggest(cfg) -> list[dict]:
    """Rank a folder of scans for labelling with a source model: what ``suggest.py`` runs.

    Reads only the images (``cfg.input``: a file, a folder or a list, as ``predict.py``) and the
    source model (``cfg.source_run``: a training run folder or checkpoint), prepared by the
    model's recorded input contract. Writes ``suggest.csv`` (rank, scan, score, why — every
    scan, label first at rank 1) and ``suggest.png`` (the cohort in the frozen-feature space,
    the top ``cfg.n`` marked) to ``cfg.out_dir``.

    Returns:
        The rows of ``suggest.csv``.

    Raises:
        io.InputError: no model, unreadable scans, or ``n`` not between 1 and the scans' number.
    """
    from omegaconf import OmegaConf

    from subseg.runs.trained_model import model_of
    from subseg.tasks import predict

    if not cfg.get("source_run"):
        raise io.InputError("name the source model: source_run=<training run folder or .ckpt>")
    named = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    is_file = Path(cfg.source_run).is_file()
    named.run_dir, named.ckpt = (None, cfg.source_run) if is_file else (cfg.source_run, None)
    model = model_of(named)
    net, contract = model.net, model.contract
    files = predict.input_images(cfg.input)
    predict.check_batch(files, cfg.input)
    n = cfg.n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(files):
        raise io.InputError(f"n={n}: give how many scans you will label, 1 to {len(files)}")
    print(f"subseg: input: {contract.describe()}")
    names = {predict.scan_outputs(cfg.input, Path(), p).name: p for p in files}
    features = features_of(net, contract, names)  # named as predict.py names them
    ids, d = distances(features)
    rows = coverage_ranking(ids, d)
    path = write(rows, ids, d, n, cfg.out_dir)
    for row in rows[:n]:
        print(f"subseg: label #{row['rank']}: {row['scan']} — {row['why']}")
    print(f"subseg: ranking of all {len(rows)} scans in {path} (figure: suggest.png)")
    return rows
