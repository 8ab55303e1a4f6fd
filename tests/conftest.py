import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (reference.py, ...)

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one intra-op thread each
    import torch

    torch.set_num_threads(1)
