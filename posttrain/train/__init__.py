"""Training: the one loop (``loop``), checkpoints, metrics log, data preparation and the stage entry points."""
