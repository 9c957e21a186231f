"""Fitting a network with Lightning, from scratch or by transfer.

It owns the training samples and their patch datasets (``samples``), a fit's data as a
``LightningDataModule`` (``patch_data``), the Lightning module and its whole-volume Dice
(``lit_module``), one configured fit with checkpoints, resume and loggers (``fitting``), weight
transfer, freeze presets and frozen-feature caching (``transfer``), and the files → checks → N4 →
atlas prior preparation every run starts with (``preparation``).
"""
