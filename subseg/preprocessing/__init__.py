"""From a scan on disk to network input, and the record that replays it for a trained model.

It owns brain extraction (``brain``), N4 bias-field correction (``bias``), atlas priors
registered to each subject with their ROI (``atlas``, also a command:
``python -m subseg.preprocessing.atlas``), the MONAI transforms that chain loading, label mapping,
N4, intensity standardisation and the atlas prior (``transforms``), and a model's input contract,
which rebuilds exactly that pipeline (``contract``).
"""
