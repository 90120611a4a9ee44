"""
Helpers of drcl2's tests (not tests themselves): the repository's constants and configs here; a
tiny DRCL2 and two-view batches (model), a test image with boxes (mapper), the import graph
(package), the emulated accelerator (emulated_device), torchvision's reference pipeline
(torchvision_reference).
"""

import glob
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The model tests' device: the CPU, or "cuda" where python -m drcl2.tools.device_check runs them
# on a GPU (DRCL2_TEST_DEVICE=cuda), or the CPU emulating one (DRCL2_TEST_DEVICE=emulated, the
# device check's dry run; helpers/emulated_device.py).
TEST_DEVICE = os.environ.get("DRCL2_TEST_DEVICE", "cpu")
if TEST_DEVICE == "emulated":
    from .emulated_device import DEVICE as _EMULATED

    TEST_DEVICE = str(_EMULATED)

# The study files directly under configs/study/, and every other config file but the Base-*.yaml.
STUDIES = sorted(
    os.path.relpath(path, REPO_ROOT)
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", "study", "*.yaml"))
)
CONFIGS = sorted(
    os.path.relpath(path, REPO_ROOT)
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(path).startswith("Base-")
    and os.path.relpath(path, REPO_ROOT) not in STUDIES
)


def cfg_from(path, *opts):
    """A drcl2 config from a file of the repository, on TEST_DEVICE (the CPU), with no initial
    weights."""
    from drcl2.config import load_config

    path = os.path.join(REPO_ROOT, path)
    return load_config(path, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", TEST_DEVICE, *opts])
