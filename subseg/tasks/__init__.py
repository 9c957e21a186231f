"""What each command runs: the top layer, on every other one.

It owns ``train.py``'s task (``train``), ``finetune.py``'s (``finetune``: TL-k, No TL, scratch-k
and the other methods), ``evaluate.py``'s and every run's test results (``evaluate``),
``predict.py``'s (``predict``), ``suggest.py``'s (``suggest``: which scans to label) and the
demo's protocol end to end (``protocol``). The top-level scripts are thin Hydra entry points
around these modules.
"""
