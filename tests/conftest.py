"""
Shared test set-up. Tests use the repository's ``datasets/`` folder as the dataset root (the toy
LVIS set is generated there once and reused, as by ``make demo``) unless $DETECTRON2_DATASETS is
set; it must be set before drcl2 is imported, since drcl2 registers its datasets on import.
"""

import json
import logging
import os

import pytest
from helpers import REPO_ROOT

os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO_ROOT, "datasets"))
EMULATED_DEVICE = os.environ.get("DRCL2_TEST_DEVICE", "cpu") == "emulated"


def pytest_configure(config):
    # detectron2 0.7.2 still calls torch.jit.script at import; torch warns on every import.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning"
    )
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated")


@pytest.fixture(autouse=True)
def emulated_device():
    """DRCL2_TEST_DEVICE=emulated: every test runs under the emulated accelerator's rules."""
    if not EMULATED_DEVICE:
        yield None
        return
    from helpers.emulated_device import EmulatedDevice

    with EmulatedDevice() as mode:
        yield mode


@pytest.fixture(scope="session")
def toy_lvis_root():
    """The dataset root with the toy LVIS set generated (once per machine, then reused)."""
    from drcl2.data.generated import ensure_toy_lvis

    root = os.environ["DETECTRON2_DATASETS"]
    ensure_toy_lvis(root)
    return root


@pytest.fixture(scope="session")
def toy_val_mini(toy_lvis_root, tmp_path_factory):
    """
    A few lvis_v1_toy_val images that hold rare, common and frequent classes, registered as their
    own LVIS-format dataset (same image files and categories); its name.
    """
    from detectron2.data import MetadataCatalog

    from drcl2.data import register_lvis_format

    meta = MetadataCatalog.get("lvis_v1_toy_val")
    with open(meta.json_file) as f:
        data = json.load(f)
    group = {c["id"]: c["frequency"] for c in data["categories"]}
    chosen, seen = [], set()
    for img in data["images"]:
        groups = {
            group[a["category_id"]] for a in data["annotations"] if a["image_id"] == img["id"]
        }
        if groups - seen:
            chosen.append(img)
            seen |= groups
        if seen == {"r", "c", "f"} and len(chosen) >= 4:
            break
    ids = {img["id"] for img in chosen}
    data["images"] = chosen
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = tmp_path_factory.mktemp("toy_val_mini") / "lvis_v1_toy_val_mini.json"
    path.write_text(json.dumps(data))
    register_lvis_format("lvis_v1_toy_val_mini", str(path), meta.image_root)
    return "lvis_v1_toy_val_mini"


@pytest.fixture(scope="session")
def own_lvis_json(toy_lvis_root, tmp_path_factory):
    """
    A user's own LVIS-format set, as a new user brings one: 5 categories with ids 1, 2, 4, 7, 9 and
    r / c / f frequencies, 12 images (the toy set's first training images, their boxes relabelled
    by the toy class modulo 5); ``(json_file, image_root)``. Not registered.
    """
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get("lvis_v1_toy_train")
    with open(meta.json_file) as f:
        data = json.load(f)
    ids = [1, 2, 4, 7, 9]
    images = data["images"][:12]
    keep = {img["id"] for img in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    for a in anns:
        a["category_id"] = ids[(a["category_id"] - 1) % 5]
    categories = [
        {"id": c, "name": f"thing{c}", "frequency": "rcfcf"[i], "image_count": 0, "synonyms": []}
        for i, c in enumerate(ids)
    ]
    for img in images:
        img.pop("neg_category_ids", None)
        img["not_exhaustive_category_ids"] = []
        img["neg_category_ids"] = []
    path = tmp_path_factory.mktemp("own_lvis") / "own_train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return str(path), meta.image_root


@pytest.fixture
def benchmarks(monkeypatch):
    """Import a benchmark script of the repository (``benchmarks/<name>.py``, not part of the
    package) as a module: ``benchmarks("bench_padding")``."""
    import importlib

    monkeypatch.syspath_prepend(os.path.join(REPO_ROOT, "benchmarks"))
    return importlib.import_module


@pytest.fixture
def one_thread():
    """
    torch on one thread for the test: the tiny models gain nothing from a second one, and on a
    2-core machine shared with other work, intra-op threads waiting for each other made steps
    ~30x slower (3 s instead of 0.1 s).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def drcl2_log(caplog, monkeypatch):
    """
    caplog on drcl2's loggers, even when a detectron2 setup_logger stopped their propagation; with
    detectron2's rate limits (log_every_n_seconds) fresh, so a line an earlier test logged still
    shows.
    """
    import detectron2.utils.logger

    monkeypatch.setattr(detectron2.utils.logger, "_LOG_TIMER", {})
    logger = logging.getLogger("drcl2")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="drcl2"):
        yield caplog
    logger.removeHandler(caplog.handler)
