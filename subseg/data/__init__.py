"""Where scans and labels come from: cohorts, found and checked, never preprocessed.

It owns synthetic cohorts built on the ICBM 2009c template (``synth``, also a command:
``python -m subseg.data.synth``), cohorts described by a ``conf/dataset`` entry with their seeded
splits (``cohort``), and BIDS datasets with the names of subseg's derivative outputs (``bids``).
"""
