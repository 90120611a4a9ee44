"""
Supervised source pre-training of a detector config's ResNet: the toy stand-in for ImageNet weights.

    python -m drcl2.tools.source_pretrain --config-file configs/toy/Base-RCNN-FPN-R18.yaml \\
        --output output/source/R18_toy_source.pth [--iters N] [--seed S] [--force]

The paper starts 2DRCL pre-training (and its baseline fine-tuning) from supervised ImageNet weights;
none can be downloaded here. This trains the config's bottom-up ResNet, built exactly as the
detector builds it (``build_backbone(cfg).bottom_up``: depth, norm, widths from MODEL.RESNETS) plus
a linear classifier on its globally pooled last stage, on the generated source classification set
(``toy_source_train``, classes disjoint from the toy detection classes), prints the top-1 accuracy
on ``toy_source_val``, and writes ``{"model": state_dict, ...}`` whose keys are exactly the
detector's ``backbone.bottom_up.*``. ``MODEL.WEIGHTS <output>`` then loads it into every config
with the same backbone settings (``configs/toy/mask_rcnn_finetune.yaml``,
``configs/toy/pretrain_2drcl.yaml``) with no renaming.

An existing output is reused (trained again only with ``--force``); it must have been made with the
same config and settings, else the command stops and says what differs. From Python (the study
runner): :func:`ensure_source_weights`.
"""
import argparse
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from detectron2.config import configurable, get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.data.samplers import TrainingSampler
from detectron2.modeling import Backbone, build_backbone
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils.env import seed_all_rng
from fvcore.common.param_scheduler import CosineParamScheduler

from .. import data as _data  # noqa: F401  (registers toy_source_train / toy_source_val)
from ..config import add_drcl2_config
from ..data.two_view_mapper import RandomResizedCropAugmentation

__all__ = [
    "SourcePretrainSettings",
    "SourceClassifier",
    "build_source_config",
    "train_source_classifier",
    "ensure_source_weights",
    "main",
]

logger = logging.getLogger(__name__)

AUTHOR = "drcl2 source pre-training"


@dataclass(frozen=True)
class SourcePretrainSettings:
    """
    The recipe. Defaults: 1,000 iterations of batch 32 at 64 px (8 epochs of the default source
    set), SGD + momentum, cosine lr after a linear warmup. The lr is low for a from-scratch ResNet:
    at 0.02 the pooled features (nearly alike across images at first) swung every logit with each
    batch and training stayed at chance (measured).
    """

    iters: int = 1000
    batch_size: int = 32
    base_lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not on norm layers (detectron2's get_default_optimizer_params)
    warmup_iters: int = 50
    input_size: int = 64  # square training / evaluation inputs (the default source images' size)
    min_crop_scale: float = 0.5  # random resized crop of [min, 1] of the image area
    seed: int = 0
    train_dataset: str = "toy_source_train"
    val_dataset: str = "toy_source_val"
    num_workers: int = 1  # DataLoader processes; not part of the recipe (see _RECIPE_EXCLUDES)


# Settings that change how fast the weights are made, not what they are meant to be: a cached file
# made with other values is still reused.
_RECIPE_EXCLUDES = ("num_workers",)


class SourceClassifier(nn.Module):
    """
    A detector's bottom-up ResNet (``trunk``) + global average pooling + a linear classifier.

    Input: a list of dicts ``{"image": Tensor[3, S, S] uint8 in INPUT.FORMAT, "label": int}`` (all
    images of one size, as the source mapper makes them). Training returns ``{"loss_cls": Tensor[]}``
    (cross-entropy); inference returns the logits ``Tensor[N, num_classes]``.
    """

    @configurable
    def __init__(
        self,
        *,
        trunk: Backbone,
        num_classes: int,
        pixel_mean: List[float],
        pixel_std: List[float],
        detector_prefix: str = "backbone.bottom_up.",
        export_frozen_bn: bool = False,
    ):
        """
        Args:
            trunk: the ResNet; its last (largest-stride) output feature is classified.
            num_classes: classes of the source set.
            pixel_mean, pixel_std: the detector's input normalisation (MODEL.PIXEL_MEAN / STD), so
                that the trunk sees inputs as the detector will show them.
            detector_prefix: where the trunk lives in the detector's state dict.
            export_frozen_bn: the detector uses FrozenBN, trained here as BN: export frozen layers.
        """
        super().__init__()
        self.trunk = trunk
        shapes = trunk.output_shape()
        self.in_feature = max(shapes, key=lambda k: shapes[k].stride)
        self.classifier = nn.Linear(shapes[self.in_feature].channels, num_classes)
        self.detector_prefix = detector_prefix
        self.export_frozen_bn = export_frozen_bn
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg, num_classes: int):
        """
        The trunk is ``build_backbone(cfg)``'s ``bottom_up`` (FPN configs) or the backbone itself
        (C4 configs), built from a copy of ``cfg`` in which every stage trains (FREEZE_AT 0, as for
        ImageNet pre-training) and FrozenBN becomes BN (frozen statistics cannot be learnt).
        """
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        export_frozen_bn = cfg.MODEL.RESNETS.NORM == "FrozenBN"
        if export_frozen_bn:
            cfg.MODEL.RESNETS.NORM = "BN"
        backbone = build_backbone(cfg)
        if hasattr(backbone, "bottom_up"):
            trunk, prefix = backbone.bottom_up, "backbone.bottom_up."
        elif isinstance(backbone, Backbone) and hasattr(backbone, "stages"):
            trunk, prefix = backbone, "backbone."
        else:
            raise ValueError(
                f"MODEL.BACKBONE.NAME '{cfg.MODEL.BACKBONE.NAME}' builds a {type(backbone).__name__} "
                "with neither a 'bottom_up' ResNet (FPN) nor ResNet stages (C4): source pre-training "
                "supports the ResNet backbones of detectron2 (build_resnet_fpn_backbone, "
                "build_resnet_backbone)."
            )
        return {
            "trunk": trunk,
            "num_classes": num_classes,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "detector_prefix": prefix,
            "export_frozen_bn": export_frozen_bn,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device, torch.float32)
        images = (images - self.pixel_mean) / self.pixel_std
        pooled = self.trunk(images)[self.in_feature].mean(dim=(2, 3))  # [N, C]
        logits = self.classifier(pooled)  # [N, num_classes]
        if not self.training:
            return logits
        labels = torch.as_tensor([x["label"] for x in batched_inputs], device=self.device)
        return {"loss_cls": F.cross_entropy(logits, labels)}

    def detector_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The trunk's weights under the detector's names (``backbone.bottom_up.*``), on the CPU."""
        state = self.trunk.state_dict()
        if self.export_frozen_bn:
            # FrozenBatchNorm2d holds BN's weight, bias, running_mean, running_var, not its counter
            state = OrderedDict((k, v) for k, v in state.items() if not k.endswith(".num_batches_tracked"))
        return OrderedDict(
            (self.detector_prefix + k, v.detach().cpu().contiguous().clone())  # NCHW even if trained NHWC
            for k, v in state.items()
        )


def build_source_config(config_file: str, opts: Optional[List[str]] = None):
    """
    detectron2's defaults + drcl2's keys + ``config_file`` + ``opts``, as train_net.py builds it;
    MODEL.DEVICE, unless ``opts`` sets it, is the GPU when there is one, else the CPU.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"--config-file '{config_file}' does not exist; pass a detector config, e.g. "
            "configs/toy/Base-RCNN-FPN-R18.yaml."
        )
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(config_file)
    opts = list(opts or [])
    cfg.merge_from_list(opts)
    if "MODEL.DEVICE" not in opts[::2]:
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def _check_settings(s: SourcePretrainSettings) -> None:
    for flag, value, ok in (
        ("--iters", s.iters, s.iters >= 1),
        ("--batch-size", s.batch_size, s.batch_size >= 1),
        ("--base-lr", s.base_lr, s.base_lr > 0),
        ("--warmup-iters", s.warmup_iters, 0 <= s.warmup_iters < s.iters),
        ("--input-size", s.input_size, s.input_size >= 32),
        ("--min-crop-scale", s.min_crop_scale, 0 < s.min_crop_scale <= 1),
        ("--num-workers", s.num_workers, s.num_workers >= 0),
    ):
        if not ok:
            raise ValueError(f"{flag} {value} is out of range (see --help).")


def _source_dicts(name: str, flag: str) -> List[Dict[str, Any]]:
    if name not in DatasetCatalog.list():
        raise ValueError(
            f"{flag} '{name}' is not a registered dataset; the toy source set is registered as "
            "toy_source_train / toy_source_val (drcl2.data.datasets.register_toy_source)."
        )
    dicts = DatasetCatalog.get(name)
    if not dicts or "label" not in dicts[0]:
        raise ValueError(
            f"{flag} '{name}' is not a classification dataset: its dicts need a 'label' "
            "(see drcl2.data.generated.toy_source.load_toy_source)."
        )
    return dicts


@torch.no_grad()
def evaluate_top1(model: SourceClassifier, loader) -> float:
    """Top-1 accuracy (%) of ``model`` over every batch of ``loader``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        labels = torch.as_tensor([x["label"] for x in batch])
        correct += int((model(batch).argmax(dim=1).cpu() == labels).sum())
        total += len(batch)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def train_source_classifier(cfg, settings: SourcePretrainSettings = SourcePretrainSettings(), progress=True):
    """
    Train a :class:`SourceClassifier` on ``settings.train_dataset`` (CPU, or MODEL.DEVICE).

    Returns:
        (model, val top-1 accuracy in %, training seconds).
    """
    _check_settings(settings)
    seed_all_rng(settings.seed)
    train_dicts = _source_dicts(settings.train_dataset, "--train-dataset")
    val_dicts = _source_dicts(settings.val_dataset, "--val-dataset")
    classes = MetadataCatalog.get(settings.train_dataset).get("thing_classes", None)
    num_classes = len(classes) if classes else 1 + max(d["label"] for d in train_dicts)

    model = SourceClassifier(cfg, num_classes).to(cfg.MODEL.DEVICE)
    on_cpu = model.device.type == "cpu"
    if on_cpu:
        # oneDNN convolutions and max pooling run faster on NHWC tensors (a convolution follows its
        # weights' layout).
        model.to(memory_format=torch.channels_last)
    size = (settings.input_size, settings.input_size)
    train_mapper = DatasetMapper(
        is_train=True,
        augmentations=[
            RandomResizedCropAugmentation(scale=(settings.min_crop_scale, 1.0)),
            T.Resize(size),
            T.RandomFlip(horizontal=True),
        ],
        image_format=cfg.INPUT.FORMAT,
    )
    train_loader = build_detection_train_loader(
        train_dicts,
        mapper=train_mapper,
        sampler=TrainingSampler(len(train_dicts), shuffle=True, seed=settings.seed),
        total_batch_size=settings.batch_size,
        aspect_ratio_grouping=False,
        num_workers=settings.num_workers,
    )
    val_loader = build_detection_test_loader(
        val_dicts,
        mapper=DatasetMapper(is_train=False, augmentations=[T.Resize(size)], image_format=cfg.INPUT.FORMAT),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
    )
    params = get_default_optimizer_params(
        model, base_lr=settings.base_lr, weight_decay=settings.weight_decay, weight_decay_norm=0.0
    )
    optimizer = torch.optim.SGD(params, lr=settings.base_lr, momentum=settings.momentum)
    scheduler = LRMultiplier(
        optimizer,
        WarmupParamScheduler(CosineParamScheduler(1.0, 0.0), 0.01, settings.warmup_iters / settings.iters),
        max_iter=settings.iters,
    )

    model.train()
    start = time.perf_counter()
    data = iter(train_loader)
    bar = tqdm(range(settings.iters), desc="source pre-training", disable=not progress, dynamic_ncols=True)
    running = None
    # Denormal floats (tiny gradients, momentum buffers) would send x86 arithmetic down its slow
    # path; the flag is per thread and process-wide state, so it is put back afterwards.
    torch.set_flush_denormal(on_cpu)
    try:
        for _ in bar:
            loss = model(next(data))["loss_cls"]
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"source pre-training diverged (loss {loss.item()}); lower --base-lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
        seconds = time.perf_counter() - start
        accuracy = evaluate_top1(model, val_loader)
    finally:
        torch.set_flush_denormal(False)
    return model, accuracy, seconds


def _recipe(cfg, settings: SourcePretrainSettings) -> Dict[str, Any]:
    """
    What the weights depend on: the settings and the config keys that build and feed the trunk
    (not the config's path: every config with this backbone shares the weights).
    """
    recipe = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _RECIPE_EXCLUDES}
    recipe["backbone"] = {
        "MODEL.BACKBONE.NAME": cfg.MODEL.BACKBONE.NAME,
        "MODEL.RESNETS": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.MODEL.RESNETS.items()},
        "MODEL.PIXEL_MEAN": list(cfg.MODEL.PIXEL_MEAN),
        "MODEL.PIXEL_STD": list(cfg.MODEL.PIXEL_STD),
        "INPUT.FORMAT": cfg.INPUT.FORMAT,
    }
    return recipe


def _save_atomic(payload: Dict[str, Any], output: str) -> None:
    """torch.save to a temporary file next to ``output``, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def ensure_source_weights(
    output: str,
    config_file: str,
    iters: Optional[int] = None,
    seed: Optional[int] = None,
    *,
    force: bool = False,
    settings: Optional[SourcePretrainSettings] = None,
    opts: Optional[List[str]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """
    The source weights of ``config_file`` at ``output``: trained and written there (atomically)
    unless a file made with the same recipe is already there (or ``force``).

    Args:
        output: the ``.pth`` to write; load it with ``MODEL.WEIGHTS output``.
        config_file: a detector config (its MODEL.RESNETS / MODEL.BACKBONE / INPUT / PIXEL_* apply).
        iters, seed: override ``settings.iters`` / ``settings.seed``.
        settings: the rest of the recipe (default :class:`SourcePretrainSettings`).
        opts: config overrides, e.g. ``["MODEL.DEVICE", "cuda"]`` (MODEL.DEVICE is not part of the
            recipe: weights made on another device are reused).
        progress: show a progress bar and print the outcome (reused or trained, val top-1).

    Returns:
        ``{"path", "val_top1" (%), "train_seconds", "reused" (bool), "recipe", "config_file",
        "num_classes"}``.

    Raises:
        ValueError: ``output`` exists but was made with another recipe, or is not such a file.
    """
    settings = settings or SourcePretrainSettings()
    settings = dataclasses.replace(
        settings,
        iters=settings.iters if iters is None else iters,
        seed=settings.seed if seed is None else seed,
    )
    cfg = build_source_config(config_file, opts)
    recipe = _recipe(cfg, settings)
    if os.path.exists(output) and not force:
        try:
            info = torch.load(output, map_location="cpu", weights_only=False)["drcl2_source_pretrain"]
        except Exception as e:
            raise ValueError(
                f"'{output}' exists but is not a drcl2 source pre-training file ({e}); pass --force "
                "to replace it, or choose another --output."
            ) from e
        if info["recipe"] != recipe:
            differ = sorted(k for k in set(recipe) | set(info["recipe"]) if recipe.get(k) != info["recipe"].get(k))
            # (a differing "backbone" is a config that builds another ResNet or feeds it otherwise)
            detail = ", ".join(f"{k}: {info['recipe'].get(k)!r} there, {recipe.get(k)!r} asked" for k in differ)
            raise ValueError(
                f"'{output}' was made with another recipe ({detail}); pass --force to train again, "
                "or choose another --output."
            )
        result = {**info, "path": output, "reused": True}
        if progress:
            _print_result(result, settings)
        return result

    model, accuracy, seconds = train_source_classifier(cfg, settings, progress=progress)
    info = {
        "recipe": recipe,
        "config_file": config_file,
        "num_classes": model.classifier.out_features,
        "val_top1": accuracy,
        "train_seconds": seconds,
    }
    _save_atomic(
        {"model": model.detector_state_dict(), "__author__": AUTHOR, "drcl2_source_pretrain": info}, output
    )
    result = {**info, "path": output, "reused": False}
    if progress:
        _print_result(result, settings)
    return result


def _print_result(result: Dict[str, Any], settings: SourcePretrainSettings) -> None:
    what = "reusing" if result["reused"] else f"trained in {result['train_seconds']:.0f} s,"
    chance = 100.0 / result["num_classes"]
    print(
        f"source weights {what} {result['path']}: top-1 on {settings.val_dataset} "
        f"{result['val_top1']:.1f}% ({result['num_classes']} classes, chance {chance:.1f}%)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.source_pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="detector config")
    parser.add_argument("--output", required=True, help="the .pth to write (MODEL.WEIGHTS)")
    parser.add_argument("--force", action="store_true", help="train again even if --output exists")
    defaults = SourcePretrainSettings()
    for field in dataclasses.fields(SourcePretrainSettings):
        default = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default,
                            help=f"(default: {default})")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, e.g. MODEL.DEVICE cuda")
    args = parser.parse_args(argv)
    settings = SourcePretrainSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(SourcePretrainSettings)}
    )
    try:
        ensure_source_weights(args.output, args.config_file, force=args.force, settings=settings, opts=args.opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
