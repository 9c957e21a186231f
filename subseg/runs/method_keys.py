"""Method keys: the names fine-tuning runs go by (``no_tl``, ``tl3``, ``scratch3``, ``full``, …).

A fine-tuning run records its key in ``summary.json`` and in its W&B config; the report groups
run folders by it, orders its columns by family and k, and draws one learning curve per family.
Building a key from a run's config (:func:`method_key`) and reading one back (:func:`family_of`)
live here side by side, below everything that uses them, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

FAMILIES = (
    ("no_tl", "No TL"),
    ("nyul_no_tl", "Nyúl No TL"),
    ("tl", "TL"),
    ("tl_adabn", "AdaBN (+ TL)"),
    ("tl_self", "self-training (+ TL)"),
    ("tl_adabn_self", "AdaBN + self-training (+ TL)"),
    ("tl_nyul", "Nyúl if the scans prefer it (+ TL)"),
    ("tl_nyul_adabn", "Nyúl if preferred + AdaBN (+ TL)"),
    ("nyul_tl", "Nyúl + TL"),
    ("scratch", "scratch"),
    ("nyul_scratch", "Nyúl scratch"),
    ("mixed", "mixed"),
    ("nyul_mixed", "Nyúl mixed"),
    ("full", "full training"),
    ("nyul_full", "Nyúl full training"),
)
"""Method families in the report's column order, with the names its figures give them."""

_KEY = re.compile(r"^(?P<family>[a-z_]+?)(?P<k>\d+)?(?P<preset>_[a-z_]+)?$")


def method_key(cfg: DictConfig) -> str:
    """The report's name of a fine-tuning run's method (no_tl, tl3, scratch3, mixed3, …).

    ``n_images=all`` from scratch is ``full`` (full training; the folds of a leave-one-out
    share it, so the report pools them), and ``tl_all`` with transfer.
    """
    k = cfg.target.n_images
    k = "_all" if k == "all" else int(k)
    prefix = "nyul_" if cfg.intensity == "nyul" else ""
    if cfg.init == "scratch":
        if k == "_all" and not cfg.get("mix_source"):
            return f"{prefix}full"
        return f"{prefix}{'mixed' if cfg.get('mix_source') else 'scratch'}{k}"
    preset = "" if cfg.freeze.name == "paper" else f"_{cfg.freeze.name}"
    picked = "_suggested" if (cfg.target.get("pick") or "random") == "suggested" else ""
    unlabelled = (cfg.get("adapt") or {}).get("label_free")
    if unlabelled not in (None, "none"):  # adapted to the unlabelled scans: tl0_adabn, tl1_self
        return f"{prefix}tl{k}{preset}{picked}_{unlabelled}"
    return f"{prefix}no_tl" if k == 0 else f"{prefix}tl{k}{preset}{picked}"


def family_of(method: str) -> tuple[str, int]:
    """(family, k) of a method key: ``tl3`` → (tl, 3); ``no_tl`` → (no_tl, 0)."""
    if method in ("no_tl", "nyul_no_tl"):
        return method, 0
    match = _KEY.match(method)
    if not match or match["k"] is None:
        return method, 0
    return match["family"] + (match["preset"] or ""), int(match["k"])


def sort_key(method: str) -> tuple:
    """Where a method goes in the report's columns: by family (:data:`FAMILIES`' order), then k."""
    family, k = family_of(method)
    names = [f for f, _ in FAMILIES]
    return (names.index(family) if family in names else len(names), family, k)
