"""subseg: sub-cortical segmentation with few-shot transfer to new scanners."""
