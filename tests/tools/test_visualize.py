"""
python -m drcl2.tools.visualize (views, predictions), the pictures of drcl2.utils.visualize and the
VIS_PERIOD hook: the pictures show the views, boxes, masks and detections they claim to.
"""

import json
import os

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, cfg_from
from PIL import Image

from drcl2.data.rebalance import build_rebalance_schedule
from drcl2.modeling.draws import model_draws

PRETRAIN = "configs/toy/pretrain_2drcl.yaml"
FINETUNE = "configs/toy/mask_rcnn_finetune.yaml"
FAST = ("DATALOADER.NUM_WORKERS", "0")


@pytest.fixture(scope="module")
def pretraining(toy_lvis_root):
    """The toy pre-training config, its model as the tool builds it, the first training batch."""
    from drcl2.engine import Trainer

    cfg = cfg_from(PRETRAIN, *FAST)
    dataset = Trainer.build_train_dataset(cfg)
    model = Trainer.build_model(cfg)
    model.seed = cfg.SEED
    schedule = build_rebalance_schedule(cfg)  # as the Trainer: one schedule, model and sampler
    model.rebalance_schedule = schedule
    model.set_class_statistics(dataset)
    loader = Trainer.build_train_loader(cfg, dataset=dataset, seed=cfg.SEED, schedule=schedule)
    batch = next(iter(loader))
    return cfg, model, batch


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _up(image, s):
    return image.repeat(s, 0).repeat(s, 1)


def _drawn_zone(shape, boxes, s, margin=6, label_width=220, label_height=24):
    """True where a box outline or its label (top left, inside, may run past the right edge)
    can be, in a panel of ``shape`` enlarged ``s`` times."""
    zone = np.zeros(shape[:2], dtype=bool)
    for x0, y0, x1, y1 in (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * s).tolist():
        ya, yb = int(y0) - margin, int(y1) + margin + 1
        xa, xb = int(x0) - margin, int(x1) + margin + 1
        ring = np.zeros_like(zone)
        ring[max(ya, 0) : yb, max(xa, 0) : xb] = True
        inner = np.zeros_like(zone)
        inner[
            max(ya + 2 * margin, 0) : max(yb - 2 * margin, 0),
            max(xa + 2 * margin, 0) : max(xb - 2 * margin, 0),
        ] = True
        zone |= ring & ~inner
        zone[max(ya, 0) : int(y0) + label_height, max(xa, 0) : int(x0) + label_width] = True
    return zone


def _rgb(view, image_format):
    """A view's image (Tensor[3, H, W] uint8 BGR) as ndarray[H, W, 3] RGB."""
    assert image_format == "BGR"
    return np.ascontiguousarray(view["image"].permute(1, 2, 0).numpy()[:, :, ::-1])


def test_views_tool_draws_the_two_views_their_pairs_and_the_masked_patches(
    pretraining, tmp_path, capsys
):
    from drcl2.tools import visualize
    from drcl2.utils.visualize import _PAIR_COLORS, PANEL_GAP, picture_scale

    cfg, model, batch = pretraining
    out = tmp_path / "views"
    argv = ["views", "--config-file", os.path.join(REPO_ROOT, PRETRAIN), "--num-images", "3"]
    assert visualize.main(argv + ["--output-dir", str(out), *FAST]) == 0
    assert "wrote 3 pictures" in capsys.readouterr().out
    files = sorted(os.listdir(out))
    assert len(files) == 3 and all(f.endswith(".png") for f in files)
    assert files[0].startswith("000_iter0_")
    assert files[0].endswith(os.path.splitext(os.path.basename(batch[0]["file_name"]))[0] + ".png")

    # The first picture against the first image of the Trainer's first batch, drawn by the model.
    sampled, masks = model_draws(model, batch, 0)
    x, mask = batch[0], masks[0].numpy()
    assert mask.any() and (~mask).any()
    view1, view2 = _rgb(x["view1"], cfg.INPUT.FORMAT), _rgb(x["view2"], cfg.INPUT.FORMAT)
    s = picture_scale([view1.shape[:2], view2.shape[:2]])
    assert s >= 2 and max(view1.shape[:2]) * s >= 384
    picture = _png(out / files[0])
    h1, w1 = view1.shape[0] * s, view1.shape[1] * s
    h2, w2 = view2.shape[0] * s, view2.shape[1] * s
    assert picture.shape == (max(h1, h2), w1 + PANEL_GAP + w2, 3)
    left, right = picture[:h1, :w1], picture[:h2, w1 + PANEL_GAP :]
    assert (picture[:, w1 : w1 + PANEL_GAP] == 255).all()  # the gap

    # Left: view 1 enlarged, its masked patches in the pixel mean (BGR -> RGB), outside drawings.
    mean_rgb = np.round(np.asarray(cfg.MODEL.PIXEL_MEAN)[::-1]).astype(np.uint8)
    masked_view1 = view1.copy()
    masked_view1[mask] = mean_rgb
    expected_left = _up(masked_view1, s)
    boxes1 = x["view1"]["instances"].gt_boxes.tensor.numpy()
    targets = x["view1"]["targets"].gt_boxes.tensor.numpy()
    free = ~_drawn_zone(left.shape, np.concatenate([boxes1, targets]), s)
    assert free.mean() > 0.2
    assert (left[free] == expected_left[free]).all()
    up_mask = _up(mask, s)
    assert (free & up_mask).sum() > 100 and (free & ~up_mask).sum() > 100
    assert (left[free & up_mask] == mean_rgb).all()  # the model's mask, shown
    assert (_up(view1, s)[free & up_mask] != mean_rgb).any(-1).mean() > 0.5  # and it shows
    # Right: view 2 enlarged, not masked.
    boxes2 = x["view2"]["instances"].gt_boxes.tensor.numpy()
    free2 = ~_drawn_zone(right.shape, boxes2, s)
    assert free2.mean() > 0.2
    assert (right[free2] == _up(view2, s)[free2]).all()

    # Pair i: an outline in both views, in the same colour (the pair's, over 0.1 of the image).
    assert len(boxes1) >= 2 and sampled[0] is not None and len(sampled[0]) == len(boxes1)
    colours = []
    for panel, boxes, raw in ((left, boxes1, expected_left), (right, boxes2, _up(view2, s))):
        i = int(np.argmax(boxes[:, 3] - boxes[:, 1]))  # the tallest pair: a long left edge
        x0, y0, y1 = (boxes[i, [0, 1, 3]] * s).tolist()
        col, rows = int(round(x0)), slice(int(y0) + 30, int(y1) - 5)
        if col >= panel.shape[1]:
            col = panel.shape[1] - 1
        edge = panel[rows, col].astype(np.float64)
        assert len(edge) > 5
        assert (panel[rows, col] != raw[rows, col]).any(-1).mean() > 0.8  # drawn
        colours.append((i, np.median(edge, axis=0)))
    for i, colour in colours:
        assert np.abs(colour - 255 * _PAIR_COLORS[i]).max() < 40, (i, colour)


def test_views_refuses_a_detector_config_and_an_unknown_dataset(toy_lvis_root, tmp_path, capsys):
    from drcl2.tools import visualize

    argv = ["views", "--num-images", "1", "--output-dir", str(tmp_path), *FAST]
    code = visualize.main(
        argv[:1] + ["--config-file", os.path.join(REPO_ROOT, FINETUNE)] + argv[1:]
    )
    err = capsys.readouterr().err
    assert code == 1 and "MODEL.META_ARCHITECTURE" in err and "GeneralizedRCNN" in err
    argv += ["DATASETS.TRAIN", "('no_such_set',)"]
    code = visualize.main(
        argv[:1] + ["--config-file", os.path.join(REPO_ROOT, PRETRAIN)] + argv[1:]
    )
    err = capsys.readouterr().err
    assert code == 1 and "DATASETS.TRAIN" in err and "no_such_set" in err
    assert not os.listdir(tmp_path)


def test_draws_are_those_of_the_training_step(pretraining):
    """DRCL2.draws gives the instances and masks the training forward draws (DRB at lambda > 0)."""
    from detectron2.utils.events import EventStorage

    cfg, model, batch = pretraining
    iteration = cfg.SOLVER.MAX_ITER - 1  # lambda ~1: the class weights count
    lam, weights = model.term_weights_at(iteration)
    assert lam > 0 and not torch.equal(weights["masking"], torch.ones_like(weights["masking"]))
    seen = []
    draw = model._draw

    def recording_draw(*args, **kwargs):
        seen.append(draw(*args, **kwargs))
        return seen[-1]

    saved = model.mask_ratio, model.mask_box_guided
    # a few masked patches, all in boxes: where they go depends on the boxes' class weights
    model.mask_ratio, model.mask_box_guided = 0.1, 1.0
    try:
        model._draw = recording_draw
        with EventStorage(iteration), torch.no_grad():
            model.train()
            model(batch)
        del model._draw
        sampled, masks = model_draws(model, batch, iteration)
        ones = {t: torch.ones_like(w) for t, w in weights.items()}
        model.term_weights_at = lambda it: (0.0, ones)
        unweighted = model_draws(model, batch, iteration)
    finally:
        model.__dict__.pop("_draw", None)
        model.__dict__.pop("term_weights_at", None)
        model.mask_ratio, model.mask_box_guided = saved
    ((step_sampled, step_mask),) = seen
    for a, b in zip(sampled, step_sampled):
        assert torch.equal(a, b)
    for x, m, step_m in zip(batch, masks, step_mask):
        h, w = x["view1"]["image"].shape[-2:]
        assert m.shape == (h, w) and torch.equal(m, step_m[:h, :w].cpu())
    # the test sees the weights: without them the draws differ
    assert any(not torch.equal(a, b) for a, b in zip(unweighted[0], sampled)) or any(
        not torch.equal(a, b) for a, b in zip(unweighted[1], masks)
    )
    _, other = model_draws(model, batch, iteration + 1)
    assert any(not torch.equal(a, b) for a, b in zip(other, masks))  # per iteration


def test_vis_hook_puts_the_views_picture_every_period(pretraining):
    from types import SimpleNamespace

    from detectron2.data import MetadataCatalog
    from detectron2.utils.events import EventStorage

    from drcl2.engine.hooks import TwoViewVisHook
    from drcl2.utils.visualize import views_pictures

    cfg, model, batch = pretraining
    cfg = cfg.clone()
    cfg.VIS_PERIOD = 2
    hook = TwoViewVisHook.from_config(cfg)
    model.train()
    model.forward = lambda inputs: {}  # the step itself is not what is tested
    try:
        with EventStorage(0) as storage:
            hook.trainer = SimpleNamespace(model=model, iter=0, storage=storage)
            hook.before_train()
            for it in range(5):
                storage.iter = hook.trainer.iter = it
                model(batch)
                hook.after_step()
            hook.after_train()
            images = list(storage._vis_data)
        model(batch)  # the pre-hook is gone
    finally:
        del model.forward
    assert [(name, it) for name, _, it in images] == [("drcl2/views", 0), ("drcl2/views", 2),
                                                      ("drcl2/views", 4)]  # fmt: skip
    metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    for _, image, it in images:
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        (expected,) = views_pictures(
            model, batch, it, image_format=cfg.INPUT.FORMAT, metadata=metadata, num_images=1
        )
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert not torch.equal(images[0][1], images[1][1])  # each step's own masks
    assert hook._batch is None


class _FixedDetector(torch.nn.Module):
    """A detector stub that finds two boxes in every image: one sure, one not."""

    BOXES = [[10.0, 12.0, 70.0, 60.0], [80.0, 70.0, 120.0, 110.0]]
    SCORES = [0.9, 0.3]

    def forward(self, inputs):
        from detectron2.structures import Boxes, Instances

        out = []
        for x in inputs:
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.tensor(self.BOXES))
            inst.scores = torch.tensor(self.SCORES)
            inst.pred_classes = torch.tensor([0, 1])
            out.append({"instances": inst})
        return out


def test_predictions_on_image_files_draw_the_detections_above_the_threshold(
    toy_lvis_root, tmp_path, monkeypatch, capsys
):
    from detectron2.data import DatasetCatalog

    from drcl2.engine import Trainer
    from drcl2.tools import visualize
    from drcl2.utils.visualize import picture_scale

    image = np.asarray(Image.open(DatasetCatalog.get("lvis_v1_toy_val")[0]["file_name"]))
    image = np.ascontiguousarray(image[:, :, :3])
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(image).save(jpeg, quality=95)
    raw = np.asarray(Image.open(jpeg).convert("RGB"))
    weights = tmp_path / "w.pth"
    torch.save({"model": {}}, weights)
    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: _FixedDetector()))
    out = tmp_path / "pred"
    argv = ["predictions", "--config-file", os.path.join(REPO_ROOT, FINETUNE)]
    argv += ["--output-dir", str(out), "--images", str(jpeg), "MODEL.WEIGHTS", str(weights)]
    assert visualize.main(argv + ["MODEL.DEVICE", "cpu"]) == 0, capsys.readouterr().err
    (name,) = os.listdir(out)
    assert name == "000_photo.png"
    picture = _png(out / name)
    s = picture_scale([raw.shape[:2]])
    assert picture.shape == (raw.shape[0] * s, raw.shape[1] * s, 3)  # predictions only
    expected = _up(raw, s)
    (x0, y0, x1, y1), low = (np.asarray(b) * s for b in _FixedDetector.BOXES)
    sure_edge = picture[int(y0) + 30 : int(y1) - 5, int(round(x0))]
    assert (sure_edge != expected[int(y0) + 30 : int(y1) - 5, int(round(x0))]).any(-1).mean() > 0.8
    zone = np.zeros(picture.shape[:2], dtype=bool)
    zone[int(low[1]) - 10 : int(low[3]) + 10, int(low[0]) - 10 : int(low[2]) + 10] = True
    zone &= ~_drawn_zone(picture.shape, [_FixedDetector.BOXES[0]], s)
    assert zone.sum() > 1000 and (picture[zone] == expected[zone]).all()  # 0.3 < 0.5: not drawn


@pytest.fixture(scope="module")
def random_detector_weights(toy_lvis_root, tmp_path_factory):
    """A weights file of the toy fine-tuning detector at its random initialisation."""
    from drcl2.engine import Trainer

    model = Trainer.build_model(cfg_from(FINETUNE))
    path = tmp_path_factory.mktemp("weights") / "random.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.mark.slow
def test_predictions_on_a_dataset_beside_the_ground_truth(random_detector_weights, tmp_path):
    from detectron2.data import DatasetCatalog

    from drcl2.tools import visualize
    from drcl2.utils.visualize import PANEL_GAP, picture_scale

    records = DatasetCatalog.get("lvis_v1_toy_val")[:2]
    config = os.path.join(REPO_ROOT, FINETUNE)
    pictures = {}
    for threshold in ("0.0", "0.99"):  # random weights: every score is ~1 / 31
        out = tmp_path / threshold
        argv = ["predictions", "--config-file", config, "--dataset", "lvis_v1_toy_val"]
        argv += ["--num-images", "2", "--output-dir", str(out), "--score-threshold", threshold]
        argv += ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", random_detector_weights]
        assert visualize.main(argv) == 0
        files = sorted(os.listdir(out))
        assert len(files) == 2
        pictures[threshold] = [_png(out / f) for f in files]
    for i, record in enumerate(records):
        raw = np.asarray(Image.open(record["file_name"]).convert("RGB"))
        s = picture_scale([raw.shape[:2]])
        w = raw.shape[1] * s
        expected = _up(raw, s)
        for threshold, drawn in (("0.0", True), ("0.99", False)):
            picture = pictures[threshold][i]
            assert picture.shape == (raw.shape[0] * s, 2 * w + PANEL_GAP, 3)
            truth, predictions = picture[:, :w], picture[:, w + PANEL_GAP :]
            assert (truth != expected).any(-1).mean() > 0.02  # the ground truth is drawn
            changed = (predictions != expected).any(-1).mean()
            assert changed > 0.02 if drawn else changed == 0, (threshold, changed)


def test_predictions_name_what_is_missing(toy_lvis_root, tmp_path, capsys):
    from drcl2.tools import visualize

    base = ["predictions", "--config-file", os.path.join(REPO_ROOT, FINETUNE)]
    out = ["--output-dir", str(tmp_path / "out"), "MODEL.DEVICE", "cpu"]
    missing = str(tmp_path / "missing.pth")
    assert visualize.main(base + ["--dataset", "lvis_v1_toy_val"] + out[:2] + [
        "MODEL.WEIGHTS", missing]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "MODEL.WEIGHTS" in err and missing in err
    weights = tmp_path / "w.pth"
    torch.save({"model": {}}, weights)
    opts = ["MODEL.WEIGHTS", str(weights)]
    assert visualize.main(base + ["--dataset", "no_such_set"] + out + opts) == 1
    err = capsys.readouterr().err
    assert "--dataset" in err and "no_such_set" in err
    assert visualize.main(base + ["--images", str(tmp_path / "nope.jpg")] + out + opts) == 1
    assert "nope.jpg" in capsys.readouterr().err
    pretrain = ["predictions", "--config-file", os.path.join(REPO_ROOT, PRETRAIN)]
    assert visualize.main(pretrain + ["--dataset", "lvis_v1_toy_val"] + out + opts) == 1
    assert "DRCL2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_vis_period_in_training_puts_pictures_and_leaves_the_losses(
    toy_lvis_root, tmp_path, monkeypatch, one_thread
):
    """The toy pre-training with VIS_PERIOD 2: pictures at iterations 0 and 2, and the committed
    reference losses, bit for bit (the hook changes nothing of the step)."""
    from detectron2.utils.events import EventStorage

    from drcl2.engine import Trainer
    from drcl2.engine.hooks import TwoViewVisHook

    put = []
    original = EventStorage.put_image

    def recording_put_image(self, name, image):
        put.append((name, self.iter, tuple(image.shape)))
        return original(self, name, image)

    monkeypatch.setattr(EventStorage, "put_image", recording_put_image)
    torch.manual_seed(0)
    cfg = cfg_from(
        PRETRAIN,
        "OUTPUT_DIR", str(tmp_path / "pretrain"),
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "DATASETS.TEST", "()",
        "VIS_PERIOD", "2",
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert sum(isinstance(h, TwoViewVisHook) for h in trainer._hooks) == 1
    trainer.resume_or_load(resume=False)
    trainer.train()
    # (detectron2's mask head, trained by the DET head, puts its own pictures at VIS_PERIOD too)
    ours = [(it, shape) for name, it, shape in put if name == "drcl2/views"]
    assert [it for it, _ in ours] == [0, 2]
    assert all(shape[0] == 3 and max(shape[1:]) >= 384 for _, shape in ours)
    with open(os.path.join(REPO_ROOT, "tests", "reference", "toy_losses.json")) as f:
        reference = json.load(f)["pretrain"]
    for name, values in reference.items():
        got = [v for v, _ in trainer.storage.history(name).values()]
        assert got == values, name
    events = [f for f in os.listdir(tmp_path / "pretrain") if f.startswith("events.out")]
    assert events  # TensorBoard's writer took them

    cfg.defrost()
    cfg.VIS_PERIOD = 0
    cfg.OUTPUT_DIR = str(tmp_path / "off")
    assert not any(isinstance(h, TwoViewVisHook) for h in Trainer(cfg)._hooks)
