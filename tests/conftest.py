"""Tests import the top-level modules (model, data, ...) from the repository root, and run torch on one
thread: their models are tiny, so a second thread buys nothing, and on a busy 2-core machine two threads
per process oversubscribe the cores (several times slower). Subprocesses inherit the setting."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)
