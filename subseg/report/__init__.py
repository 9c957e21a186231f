"""What a protocol's runs add up to, without Lightning or Hydra (usable from a notebook).

It owns the paper's tables and figures gathered from any set of run folders (``report``, also a
command: ``python -m subseg.report.report``) and the demo's summary and picture of its cohorts
(``cohort_preview``).
"""
