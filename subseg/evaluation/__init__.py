"""Scoring segmentations, with or without a reference label.

It owns Dice, HD95, ASSD, volumes and the Avg/wAvg summaries (``metrics``, also a command:
``python -m subseg.evaluation.metrics``), paired Wilcoxon tests with Holm correction (``stats``),
and the label-free quality score that says which scans to check first (``quality``).
"""
