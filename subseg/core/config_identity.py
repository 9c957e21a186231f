"""What in a task config changes a run's result, and the short id default run names end with.

Registered here, on ``import subseg``, as the OmegaConf resolver ``config_id``: every task config
names its run ``…_${config_id:}``, and any code that resolves such a config (a run folder's
``.hydra/config.yaml`` read back, a notebook) must find the resolver whatever it imported.
This module imports nothing of subseg's, so the package import stays light.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

LOCAL_KEYS = ("cache_dir", "threads")
"""Settings that change where or how fast, never what: never recorded, taken from the options."""

UNHASHED_KEYS = ("resume", "num_workers", "logger", "paths", "overwrite")
"""Config keys that change where or how a run is made, never its result: outside the hash.

Paths the config resolves from them (a dataset's ``root``) stay in: a cohort moved elsewhere is
treated as another cohort and its runs are redone.
"""


def strip(node):
    """A config without what never changes a result (:data:`LOCAL_KEYS`)."""
    if isinstance(node, Mapping):
        return {k: strip(v) for k, v in node.items() if k not in LOCAL_KEYS}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def config_id(*, _root_) -> str:
    """8 hex digits of everything in a config that changes a run's result, its name aside.

    The ``config_id`` resolver: a default run name (``name: ${dataset.name}_${config_id:}``)
    differs whenever the runs do, so another seed, recipe, cohort root, ``target.ids`` or source
    run gets a folder of its own instead of colliding with a finished run. The name itself and
    Hydra's own settings are left out (the name refers to this value; Hydra's settings say
    where, not what).
    """
    kept = {}
    for key in _root_.keys():  # keys() resolves nothing: the name would refer back to us
        if key in ("name", "hydra", *UNHASHED_KEYS):
            continue
        value = _root_[key]
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        kept[key] = value
    text = json.dumps(strip(kept), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


OmegaConf.register_new_resolver("config_id", config_id, replace=True)
