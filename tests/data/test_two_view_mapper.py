"""TwoViewDatasetMapper: box correspondence across views and the instance-drop rule."""

import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures.masks import polygons_to_bitmask
from helpers import REPO_ROOT
from helpers.mapper import BOXES, COLOURS, FixedCrop, record, write_image

from drcl2.config import add_drcl2_config
from drcl2.data.two_view_mapper import TwoViewDatasetMapper


def toy_mapper(**opts):
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/toy/pretrain_2drcl.yaml"))
    cfg.merge_from_list(
        [
            "INPUT.DRCL2.COLOR_JITTER_PROB", 0.0,
            "INPUT.DRCL2.GRAYSCALE_PROB", 0.0,
            "INPUT.DRCL2.BLUR_PROB", (0.0, 0.0),
            "INPUT.DRCL2.SOLARIZE_PROB", (0.0, 0.0),
        ]
    )  # fmt: skip
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return TwoViewDatasetMapper(cfg, is_train=True)


def test_box_content_matches_across_views(tmp_path):
    path, image = write_image(tmp_path)
    mapper = toy_mapper()
    np.random.seed(0)
    torch.manual_seed(0)
    seen = 0
    for _ in range(8):
        out = mapper(record(path))
        i1, i2 = out["view1"]["instances"], out["view2"]["instances"]
        assert torch.equal(i1.gt_ids, i2.gt_ids) and torch.equal(i1.gt_classes, i2.gt_classes)
        assert 4 not in i1.gt_ids.tolist()  # the crowd annotation never enters
        for v in ("view1", "view2"):
            img = out[v]["image"].permute(1, 2, 0).numpy()
            assert img.shape[:2] == out[v]["instances"].image_size
            for box, cls in zip(
                out[v]["instances"].gt_boxes.tensor.tolist(), out[v]["instances"].gt_classes
            ):
                x0, y0, x1, y1 = [int(round(c)) for c in box]
                inner = img[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3).astype(float)
                if len(inner):
                    assert np.abs(inner.mean(0) - np.array(COLOURS[int(cls)])).max() < 20
                    seen += 1
    assert seen > 10


def test_transforms_undo_to_the_original_box(tmp_path):
    path, image = write_image(tmp_path)
    mapper = toy_mapper()
    np.random.seed(3)
    boxes = np.array(BOXES, dtype=np.float64)
    for v in (0, 1):
        view_image, view_boxes, visible, transforms = mapper.make_view(image, boxes, v)
        inverse = transforms.inverse()
        for b, vis, orig in zip(view_boxes, visible, boxes):
            if vis < 0.3:
                continue
            back = inverse.apply_box(b[None])[0]
            # The undone view box is the part of the original box inside the crop.
            assert back[0] >= orig[0] - 1.5 and back[1] >= orig[1] - 1.5
            assert back[2] <= orig[2] + 1.5 and back[3] <= orig[3] + 1.5
            area = (back[2] - back[0]) * (back[3] - back[1])
            assert area / ((orig[2] - orig[0]) * (orig[3] - orig[1])) == pytest.approx(vis, abs=0.1)


def test_instances_not_surviving_both_crops_are_dropped(tmp_path):
    path, _ = write_image(tmp_path)
    # View 1 keeps x in [0, 64): box 0 fully, box 1 (60..100) 10% -> dropped, box 2 (20..70) 88%,
    # box 3 not at all. View 2 keeps y in [0, 100): box 2 (70..110) 75%, box 3 (80..120) 50%.
    mapper = TwoViewDatasetMapper(
        geometric1=[FixedCrop(0, 0, 64, 128)],
        geometric2=[FixedCrop(0, 0, 128, 100)],
        image_format="BGR",
        min_visible=0.3,
        min_side=4,
    )
    out = mapper(record(path))
    assert out["view1"]["instances"].gt_ids.tolist() == [0, 2]
    assert out["view2"]["instances"].gt_ids.tolist() == [0, 2]
    assert out["view1"]["instances"].gt_boxes.tensor[1].tolist() == [20, 70, 64, 110]
    # Stricter rule: box 2 keeps 88% in view 1 and 75% in view 2 -> dropped at 0.8.
    mapper.min_visible = 0.8
    assert mapper(record(path))["view1"]["instances"].gt_ids.tolist() == [0]
    # An image whose instances all fall outside still yields two views with empty instances.
    empty = TwoViewDatasetMapper(
        geometric1=[FixedCrop(0, 0, 6, 6)], geometric2=[FixedCrop(0, 0, 6, 6)]
    )
    out = empty(record(path))
    assert len(out["view1"]["instances"]) == 0 and out["view2"]["image"].shape == (3, 6, 6)


def test_photometric_views_differ_and_keep_format(tmp_path):
    path, _ = write_image(tmp_path)
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/toy/pretrain_2drcl.yaml"))
    mapper = TwoViewDatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    np.random.seed(0)
    out = mapper(record(path))
    for v in ("view1", "view2"):
        assert out[v]["image"].dtype == torch.uint8 and out[v]["image"].shape[0] == 3
    with pytest.raises(ValueError, match="min_visible"):  # __init__ names its argument
        TwoViewDatasetMapper(geometric1=[], geometric2=[], min_visible=1.5)
    with pytest.raises(ValueError, match=r"INPUT\.DRCL2\.MIN_VISIBLE"):  # from_config, the key
        toy_mapper(**{"INPUT.DRCL2.MIN_VISIBLE": 1.5})


@pytest.mark.parametrize(
    "key,value",
    [
        ("INPUT.DRCL2.BLUR_KERNEL_SIZE", 8),
        ("INPUT.DRCL2.SOLARIZE_PROB", (0.0, 1.5)),
        ("INPUT.DRCL2.CROP_SCALE", (0.5, 0.2)),
        ("INPUT.DRCL2.GRAYSCALE_PROB", -0.1),
    ],
)
def test_invalid_view_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        toy_mapper(**{key: value})


def square_polygons(record_dict):
    """The record with each box's square as its polygon."""
    for a in record_dict["annotations"]:
        x0, y0, x1, y1 = a["bbox"]
        a["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    return record_dict


def test_an_object_visible_only_in_view1_is_a_detection_target(tmp_path):
    """View 1's targets are its own survivors (detectron2's rule), not the pairs that also survive
    view 2: box 1 is 10% inside view 1 (a target, clipped; not a pair), box 3 is outside it."""
    path, _ = write_image(tmp_path)
    mapper = TwoViewDatasetMapper(
        geometric1=[FixedCrop(0, 0, 64, 128)],
        geometric2=[FixedCrop(0, 0, 128, 100)],
        min_visible=0.3,
        min_side=4,
    )
    out = mapper(record(path))
    assert out["view1"]["instances"].gt_ids.tolist() == [0, 2]
    targets = out["view1"]["targets"]
    assert targets.gt_classes.tolist() == [0, 1, 2]
    assert targets.gt_boxes.tensor.tolist() == [[8, 8, 40, 40], [60, 10, 64, 50], [20, 70, 64, 110]]
    assert targets.image_size == (128, 64) and "targets" not in out["view2"]
    # with view 2 uncropped every view-1 survivor is also a pair (boxes 0 and 2 at >= 30%)
    mapper = TwoViewDatasetMapper(
        geometric1=[FixedCrop(0, 0, 64, 128)], geometric2=[], min_visible=0.3
    )
    assert mapper(record(path))["view1"]["instances"].gt_ids.tolist() == [0, 2]


@pytest.mark.parametrize("crop", [False, True])
def test_view1_targets_carry_masks(tmp_path, crop):
    """With masks on, view 1's targets hold each object's mask in the view (polygons; bitmasks when
    the view is cropped): it covers its box and nothing far outside it."""
    path, _ = write_image(tmp_path)
    geometric = [FixedCrop(0, 0, 64, 128)] if crop else []
    mapper = TwoViewDatasetMapper(
        geometric1=geometric + [T.Resize((96, 96 if not crop else 48))], geometric2=[], mask_on=True
    )
    targets = mapper(square_polygons(record(path)))["view1"]["targets"]
    h, w = targets.image_size
    masks = targets.gt_masks
    assert len(masks) == len(targets) == (3 if crop else 4)
    if hasattr(masks, "tensor"):
        bitmasks = masks.tensor
    else:
        bitmasks = torch.stack(
            [torch.as_tensor(polygons_to_bitmask(p, h, w)) for p in masks.polygons]
        )
    assert type(masks).__name__ == ("BitMasks" if crop else "PolygonMasks")
    for box, mask in zip(targets.gt_boxes.tensor, bitmasks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x0, y0, x1, y1 = box.tolist()
        assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
        assert mask.sum() >= 0.8 * (x1 - x0) * (y1 - y0)


def test_shared_geometry_views_differ_only_in_colour(tmp_path):
    path, image = write_image(tmp_path)
    mapper = toy_mapper(
        **{"INPUT.DRCL2.SHARED_GEOMETRY": True, "INPUT.DRCL2.COLOR_JITTER_PROB": 1.0}
    )
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(4):
        out = mapper(record(path))
        i1, i2 = out["view1"]["instances"], out["view2"]["instances"]
        assert torch.equal(i1.gt_boxes.tensor, i2.gt_boxes.tensor)
        assert out["view1"]["image"].shape == out["view2"]["image"].shape
        assert not torch.equal(out["view1"]["image"], out["view2"]["image"])


def test_view1_without_photometric_augmentation_keeps_the_colours(tmp_path):
    path, _ = write_image(tmp_path)
    mapper = toy_mapper(**{
        "INPUT.DRCL2.VIEW1_PHOTOMETRIC": False, "INPUT.DRCL2.COLOR_JITTER_PROB": 1.0,
        "INPUT.DRCL2.CROP_PROB": (0.0, 1.0),
    })  # fmt: skip
    np.random.seed(1)
    torch.manual_seed(1)
    out = mapper(record(path))
    img = out["view1"]["image"].permute(1, 2, 0).numpy().astype(float)
    assert len(out["view1"]["targets"]) == 4  # uncropped: every object is a target
    for box, cls in zip(
        out["view1"]["targets"].gt_boxes.tensor.tolist(), out["view1"]["targets"].gt_classes
    ):
        x0, y0, x1, y1 = [int(round(c)) for c in box]
        inner = img[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3)
        assert np.abs(inner.mean(0) - np.array(COLOURS[int(cls)])).max() < 1.0
    with pytest.raises(ValueError, match="CROP_PROB"):
        toy_mapper(**{"INPUT.DRCL2.CROP_PROB": (0.5,)})
