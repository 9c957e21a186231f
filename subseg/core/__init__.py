"""The bottom layer: what every other layer uses, resting on nothing else of subseg's.

It owns the 14-structure label protocol (``labels`` and its package data ``label_tables.yaml``),
NIfTI loading, checking and atomic writing (``io``), left/right and label sanity warnings
(``sides``), content-keyed checksummed caches (``cache``), the software a run was made with
(``environment``), the ANTsPy boundary (``antspy``), threads and process pools for jobs
(``job_threads``, ``start_method``), DDP sharding (``sharding``), overlays and figures
(``overlay``, ``figures``), what in a config changes a result (``config_identity``), one writer
per folder (``folder_lock``) and the files ``predict.py`` wrote (``output_manifest``).
"""
