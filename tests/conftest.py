"""
Shared test set-up. Tests use the repository's ``datasets/`` folder as the dataset root (the toy LVIS
set is generated there once and reused, as by ``make demo``) unless $DETECTRON2_DATASETS is set; it
must be set before drcl2 is imported, since drcl2 registers its datasets on import.
"""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO_ROOT, "datasets"))
if REPO_ROOT not in sys.path:  # train_net.py lives at the top of the repository
    sys.path.insert(0, REPO_ROOT)


def pytest_configure(config):
    # detectron2 0.6 still calls torch.jit.script at import; torch warns on every import.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated")


@pytest.fixture(scope="session")
def toy_lvis_root():
    """The dataset root with the toy LVIS set generated (once per machine, then reused)."""
    from drcl2.data import ensure_toy_lvis

    root = os.environ["DETECTRON2_DATASETS"]
    ensure_toy_lvis(root)
    return root
