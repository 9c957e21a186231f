"""Runs as folders on disk, and what names and describes them.

It owns a run folder's layout, results and completion marker (``run_folder``), which trained model
a command names and its input contract (``trained_model``), the method key a fine-tuning run goes
by, built from its config and parsed back by the report (``method_keys``), and what a run tells a
W&B dashboard (``dashboard``).
"""
