"""subseg: sub-cortical segmentation with few-shot transfer to new scanners."""

from subseg import config_identity  # noqa: F401  registers the config_id resolver run names use
