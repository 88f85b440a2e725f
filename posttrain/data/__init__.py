"""Data rows: reading and validation (``rows``), encoding with loss masks (``encode``), padding-free packing and
resumable sampling (``batching``)."""
