"""subseg: sub-cortical segmentation with few-shot transfer to new scanners.

The code is layered along the data flow, one subpackage per layer, lowest first (:data:`LAYERS`):
``core`` (labels, NIfTI I/O, caches, processes and threads), ``data`` (cohorts: synthetic,
configured, BIDS), ``preprocessing`` (brain extraction, N4, atlas priors, MONAI transforms, the
input contract), ``model`` (the network, patches, dense evaluation, inference), ``evaluation``
(Dice and distances, statistics, the label-free quality score), ``runs`` (run folders, trained
models, method keys, dashboards), ``training`` (samples, the Lightning module, fitting, transfer),
``report`` (tables and figures of a protocol) and ``tasks`` (what each command runs). A module
imports only from its own subpackage or lower ones; ``tests/test_layering.py`` checks it.
The configs every command composes ship inside the package, in ``subseg/conf``
(:data:`CONF_DIR`).
"""

from pathlib import Path

from subseg.core import config_identity  # noqa: F401  registers the config_id resolver run names use

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The Hydra config tree, shipped inside the package (the repository's ``conf`` links to it)."""

LAYERS = (
    "core",
    "data",
    "preprocessing",
    "model",
    "evaluation",
    "runs",
    "training",
    "report",
    "tasks",
)
"""The subpackages, lowest first: each may import from itself and the ones before it."""
