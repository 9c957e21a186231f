"""The network and how it is run over a volume, free of Lightning and Hydra.

It owns the three-path network as a plain ``nn.Module`` (``network``), on-the-fly patches by
vectorised indexing (``patches``), exact dense evaluation of the same weights (``dense``), and the
segmentation of a subject: ROI from the atlas prior, dense probabilities, argmax and
post-processing (``inference``).
"""
