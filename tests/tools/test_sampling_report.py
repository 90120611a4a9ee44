"""python -m drcl2.tools.sampling_report on a small generated long-tailed set."""

import csv

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from drcl2.data.rebalance import repeat_factors
from drcl2.tools import sampling_report

NAME = "drb_report_test_train"
NUM_CLASSES = 12


def _dicts(num_images=300, seed=0):
    rng = np.random.default_rng(seed)
    p = np.arange(1, NUM_CLASSES + 1, dtype=np.float64) ** -2.5
    p /= p.sum()
    out = []
    for i in range(num_images):
        classes = rng.choice(NUM_CLASSES, int(rng.integers(1, 6)), p=p)
        anns = [{"category_id": int(c), "bbox": [0, 0, 8, 8], "bbox_mode": 1} for c in classes]
        out.append(
            {"file_name": f"{i}.jpg", "image_id": i, "height": 64, "width": 64, "annotations": anns}
        )
    return out


@pytest.fixture(scope="module")
def registered():
    dicts = _dicts()
    if NAME not in DatasetCatalog:
        DatasetCatalog.register(NAME, lambda: dicts)
        MetadataCatalog.get(NAME).set(thing_classes=[f"class{c}" for c in range(NUM_CLASSES)])
    return dicts


def _config(tmp_path, t_drb=0.05, t_rfs=0.05):
    cfg_file = tmp_path / "report.yaml"
    cfg_file.write_text(
        f"DATASETS:\n  TRAIN: ('{NAME}',)\n  TEST: ()\n"
        f"DATALOADER:\n  REPEAT_THRESHOLD: {t_rfs}\n  DRCL2:\n    REPEAT_THRESHOLD: {t_drb}\n"
        f"SOLVER:\n  IMS_PER_BATCH: 8\nOUTPUT_DIR: '{tmp_path / 'out'}'\n"
    )
    return str(cfg_file)


def test_report_tables_png_and_csv(registered, tmp_path, capsys):
    out = tmp_path / "report"
    result = sampling_report.main(["--config-file", _config(tmp_path), "--out", str(out)])
    printed = capsys.readouterr().out
    for row in ("| r ", "| c ", "| f ", "| all "):
        assert row in printed
    assert "DRB λ=0.5" in printed and "RFS t=0.05" in printed
    assert result["columns"] == ["none", "RFS t=0.05", "DRB λ=0", "DRB λ=0.5", "DRB λ=1"]

    # the numbers: seen_c = 1000 * B * Σ_I r_I n_Ic / Σ_I r_I
    seen = result["seen"]
    n_ic = np.zeros((len(registered), NUM_CLASSES))
    for i, d in enumerate(registered):
        for a in d["annotations"]:
            n_ic[i, a["category_id"]] += 1
    for k, r in enumerate(
        [np.ones(len(registered))]
        + [repeat_factors(registered, 0.05, lam).double().numpy() for lam in (0.0, 0.0, 0.5, 1.0)]
    ):
        np.testing.assert_allclose(seen[:, k], 8000 * (r @ n_ic) / r.sum(), rtol=1e-5)
    np.testing.assert_array_equal(seen[:, 1], seen[:, 2])  # RFS == DRB at λ = 0 (same t)
    # rebalancing moves exposure from the most frequent class to the rarest
    assert seen[-1, 4] > seen[-1, 1] > seen[-1, 0]
    assert seen[0, 4] < seen[0, 0]
    # groups fall back to LVIS's rule on the training image counts (no class_frequency metadata)
    counts = (n_ic > 0).sum(axis=0)
    assert result["groups"] == ["r" if n <= 10 else "c" if n <= 100 else "f" for n in counts]

    png = out / "sampling_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with open(out / "sampling_report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == NUM_CLASSES and rows[0]["name"] == "class0"
    assert float(rows[3]["DRB λ=1"]) == pytest.approx(seen[3, 4], rel=1e-5)


def test_report_default_out_dir_and_errors(registered, tmp_path, capsys):
    result = sampling_report.main(["--config-file", _config(tmp_path, t_rfs=0.0)])
    assert result["png"] == str(tmp_path / "out" / "sampling_report" / "sampling_report.png")
    assert "RFS t=0.05" in capsys.readouterr().out  # t = 0 for RFS falls back to the DRB t
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sampling_report.main(["--config-file", str(tmp_path / "missing.yaml")])
