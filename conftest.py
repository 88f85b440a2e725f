"""Root pytest setup, shared by tests/ and the doctests in posttrain/: CPU threads and an isolated cache."""

import os
import tempfile

import torch

torch.set_num_threads(2)
# Tests never read or write the user's cache.
os.environ["POSTTRAIN_CACHE"] = tempfile.mkdtemp(prefix="posttrain-test-cache-")
