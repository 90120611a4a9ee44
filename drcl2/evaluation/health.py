"""
Health of pre-trained weights: do the backbone, FPN and box head carry class information, or have
their features collapsed? Measured on the ground-truth boxes of a dataset, before any fine-tuning
(``python -m drcl2.tools.probe``; during training: :class:`drcl2.engine.hooks.HealthProbeHook`).

* linear probe: a multinomial logistic regression on the features of the training split's boxes
  (class-balanced loss), scored on another split: top-1, class-balanced accuracy (mean recall over
  the classes present) and the same per frequency group (r / c / f);
* nearest-class-centroid accuracy (cosine to the training split's class means), no training;
* effective rank (RankMe, Garrido et al. 2023) of the RoI features, of the box-head embeddings and
  of the FPN features at image locations, per level: ``exp(entropy(s / sum(s)))`` over the singular
  values ``s``; a collapsed representation has rank ~ 1;
* per-channel std of the l2-normalised embeddings times sqrt(dim) (SimSiam's collapse check): ~ 1
  for features spread over the sphere, 0 when every box maps to one direction;
* the box head's mean output norm;
* weight change per stage against the config's random initialisation.

The maths are pure functions of tensors (tested without a model); :func:`extract_box_features`
runs a detectron2 backbone + box head over a dataset's images at test size.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, ImageList
from torch import nn

from ..data.lvis_format import frequency_group, read_lvis_format_json

__all__ = [
    "rankme",
    "embedding_std",
    "linear_probe",
    "nearest_centroid",
    "accuracies",
    "BoxFeatures",
    "extract_box_features",
    "class_groups",
    "stage_changes",
    "feature_health",
    "STAGES",
]


# ------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------
def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """
    RankMe effective rank of ``features`` (Tensor[N, D]): ``exp(-sum_k p_k log p_k)`` with
    ``p_k = s_k / ||s||_1 + eps`` over the singular values ``s`` of the (uncentred) matrix. Between
    1 (every row on one line, e.g. constant features) and min(N, D); NaN for an empty matrix.
    """
    if features.numel() == 0:
        return float("nan")
    s = torch.linalg.svdvals(features.double())
    if float(s.sum()) == 0.0:
        return 1.0
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_std(features: torch.Tensor) -> float:
    """
    Mean over channels of the std over samples of the l2-normalised rows of ``features``
    (Tensor[N, D]), times sqrt(D): ~ 1 for directions spread over the sphere, 0 for collapse.
    """
    if features.shape[0] < 2:
        return float("nan")
    z = F.normalize(features.double(), dim=1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


def _standardise(train_x: torch.Tensor, test_x: torch.Tensor):
    mean = train_x.mean(dim=0, keepdim=True)
    std = train_x.std(dim=0, keepdim=True) if len(train_x) > 1 else torch.ones_like(mean)
    std = torch.where(
        std > 1e-6 * std.max().clamp(min=1e-12), std, torch.full_like(std, float("inf"))
    )
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> torch.Tensor:
    """
    A multinomial logistic regression on standardised features, trained with a class-balanced
    cross-entropy (each class present weighs the same in total) and an L2 penalty by L-BFGS from
    zero weights (deterministic); channels constant on the training set are ignored.

    Args:
        train_x: Tensor[N, D]; train_y: LongTensor[N] in [0, num_classes).
        test_x: Tensor[M, D].
        num_classes: C.
        weight_decay: the L2 penalty on the weights (not the biases), per unit of balanced loss.
        max_iter: L-BFGS iterations.

    Returns:
        LongTensor[M]: the predicted classes of ``test_x``.
    """
    x, xt = _standardise(train_x.double(), test_x.double())
    y = train_y.long()
    counts = torch.bincount(y, minlength=num_classes).double()
    sample_weight = (1.0 / counts.clamp(min=1))[y]
    sample_weight = sample_weight / sample_weight.sum()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    seen = counts > 0  # classes absent from training never win
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        logits = (x @ weight + bias).masked_fill(~seen, -1e9)
        loss = (F.cross_entropy(logits, y, reduction="none") * sample_weight).sum()
        loss = loss + 0.5 * weight_decay * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (xt @ weight + bias).masked_fill(~seen, -1e9).argmax(dim=1)


def nearest_centroid(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int
):
    """Predict the class whose mean l2-normalised training feature is closest in cosine:
    LongTensor[M]."""
    z = F.normalize(train_x.double(), dim=1)
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype).index_add_(0, train_y.long(), z)
    seen = torch.bincount(train_y.long(), minlength=num_classes) > 0
    scores = F.normalize(test_x.double(), dim=1) @ F.normalize(sums, dim=1).t()
    return scores.masked_fill(~seen, -2.0).argmax(dim=1)


def accuracies(
    predicted: torch.Tensor, truth: torch.Tensor, groups: Optional[Sequence[str]] = None
) -> Dict[str, float]:
    """
    Args:
        predicted, truth: LongTensor[M].
        groups: the frequency group ("r", "c", "f") of every class id, or None.

    Returns:
        {"top1": accuracy, "balanced": mean recall over the classes present in ``truth``, and per
        group g present: "balanced_<g>"}; NaN where nothing is scored.
    """
    out = {"top1": float((predicted == truth).double().mean()) if len(truth) else float("nan")}
    recalls = {}
    for c in torch.unique(truth).tolist():
        sel = truth == c
        recalls[c] = float((predicted[sel] == c).double().mean())
    out["balanced"] = float(np.mean(list(recalls.values()))) if recalls else float("nan")
    if groups is not None:
        for g in ("r", "c", "f"):
            values = [r for c, r in recalls.items() if c < len(groups) and groups[c] == g]
            out[f"balanced_{g}"] = float(np.mean(values)) if values else float("nan")
    return out


# ------------------------------------------------------------------------------------------------
# features of a model
# ------------------------------------------------------------------------------------------------
@dataclass
class BoxFeatures:
    """
    Features of the ground-truth boxes of a set of images.

    Attributes:
        roi: Tensor[R, C], RoIAlign features (the box pooler's output) averaged over the grid.
        box: Tensor[R, D], the box head's embeddings.
        classes: LongTensor[R], contiguous class ids.
        images: LongTensor[R], index of each box's image in the given dicts.
        locations: level -> Tensor[L, C], FPN features at image locations (padding excluded).
    """

    roi: torch.Tensor
    box: torch.Tensor
    classes: torch.Tensor
    images: torch.Tensor
    locations: Dict[str, torch.Tensor] = field(default_factory=dict)

    def subset(self, keep: torch.Tensor) -> "BoxFeatures":
        """The boxes where ``keep`` (BoolTensor[R]) is True; locations unchanged."""
        return BoxFeatures(
            self.roi[keep], self.box[keep], self.classes[keep], self.images[keep], self.locations
        )


@torch.no_grad()
def extract_box_features(
    backbone: nn.Module,
    box_pooler: nn.Module,
    box_head: Optional[nn.Module],
    in_features: Sequence[str],
    dataset_dicts: List[dict],
    *,
    min_size: int,
    max_size: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    image_format: str = "BGR",
    batch_size: int = 8,
    max_locations: int = 4096,
) -> BoxFeatures:
    """
    Run ``backbone`` (eval mode; its previous mode is restored) over the images of
    ``dataset_dicts``, resized as at test time (``ResizeShortestEdge(min_size, max_size)``), and
    pool the non-crowd annotated boxes with ``box_pooler`` (levels by box scale) into ``box_head``.

    Args:
        backbone, box_pooler, box_head, in_features: a detectron2 backbone (FPN) and the
            ``box_pooler`` / ``box_head`` / ``box_in_features`` of its ROI heads (``box_head``
            None: no box-head embeddings, ``box`` is Tensor[R, 0]).
        dataset_dicts: detectron2 dataset dicts with annotations.
        min_size, max_size: the test resize (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``).
        pixel_mean, pixel_std: the model's normalisation.
        image_format: ``INPUT.FORMAT``.
        batch_size: images per forward.
        max_locations: FPN locations kept per level over the whole set (an even share of each
            image's, drawn with a fixed seed).

    Returns:
        :class:`BoxFeatures` (CPU tensors, float32).
    """
    device = next(backbone.parameters()).device
    modes = [(m, m.training) for m in (backbone, box_pooler, box_head) if m is not None]
    for m, _ in modes:
        m.eval()
    mean = torch.tensor(pixel_mean, device=device).view(-1, 1, 1)
    std = torch.tensor(pixel_std, device=device).view(-1, 1, 1)
    resize = T.ResizeShortestEdge(min_size, max_size, "choice")
    per_image_locations = max(1, max_locations // max(len(dataset_dicts), 1))
    generator = torch.Generator().manual_seed(0)
    strides = {k: v.stride for k, v in backbone.output_shape().items()}
    roi, box, classes, images, locations = [], [], [], [], {k: [] for k in strides}
    try:
        for start in range(0, len(dataset_dicts), batch_size):
            chunk = dataset_dicts[start : start + batch_size]
            tensors, box_lists, chunk_classes, chunk_images = [], [], [], []
            for i, d in enumerate(chunk):
                image = utils.read_image(d["file_name"], format=image_format)
                tfm = resize.get_transform(image)
                image = tfm.apply_image(image)
                annos = [a for a in d.get("annotations", []) if a.get("iscrowd", 0) == 0]
                xyxy = np.array(
                    [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                    dtype=np.float64,
                ).reshape(-1, 4)
                xyxy = tfm.apply_box(xyxy) if len(xyxy) else xyxy
                tensors.append(
                    (
                        torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).to(device)
                        - mean
                    )
                    / std
                )
                box_lists.append(Boxes(torch.as_tensor(xyxy, dtype=torch.float32, device=device)))
                chunk_classes.append(
                    torch.as_tensor([a["category_id"] for a in annos], dtype=torch.int64)
                )
                chunk_images.append(torch.full((len(annos),), start + i, dtype=torch.int64))
            batch = ImageList.from_tensors(
                tensors,
                backbone.size_divisibility,
                padding_constraints=getattr(backbone, "padding_constraints", None),
            )
            features = backbone(batch.tensor)
            pooled = box_pooler([features[f] for f in in_features], box_lists)
            if len(pooled):
                roi.append(pooled.mean(dim=(2, 3)).float().cpu())
                embedded = (
                    box_head(pooled).flatten(1)
                    if box_head is not None
                    else pooled.new_zeros(len(pooled), 0)
                )
                box.append(embedded.float().cpu())
            classes += chunk_classes
            images += chunk_images
            for name, f in features.items():
                stride = strides[name]
                for j, (h, w) in enumerate(batch.image_sizes):
                    valid = f[j, :, : math.ceil(h / stride), : math.ceil(w / stride)].flatten(1).t()
                    pick = torch.randperm(len(valid), generator=generator)[:per_image_locations]
                    locations[name].append(valid[pick.to(valid.device)].float().cpu())
    finally:
        for m, was_training in modes:
            m.train(was_training)
    empty = torch.zeros(0, 0)
    return BoxFeatures(
        roi=torch.cat(roi) if roi else empty,
        box=torch.cat(box) if box else empty,
        classes=torch.cat(classes) if classes else torch.zeros(0, dtype=torch.int64),
        images=torch.cat(images) if images else torch.zeros(0, dtype=torch.int64),
        locations={k: torch.cat(v) for k, v in locations.items() if v},
    )


def class_groups(
    dataset_name: str, num_classes: int, train_dicts: Optional[List[dict]] = None
) -> List[str]:
    """
    The frequency group ("r", "c", "f") of every contiguous class id of a registered dataset: its
    metadata's ``class_frequency``, else the ``frequency`` of its json's categories, else LVIS's
    rule on the image counts of ``train_dicts``; "" where none is known.
    """
    meta = MetadataCatalog.get(dataset_name)
    groups = meta.get("class_frequency", None)
    if groups is not None and len(groups) == num_classes:
        return list(groups)
    json_file = meta.get("json_file", None)
    if json_file:
        try:
            categories = sorted(
                read_lvis_format_json(json_file)["categories"], key=lambda c: c["id"]
            )
        except (ValueError, FileNotFoundError):
            categories = []
        id_map = meta.get("thing_dataset_id_to_contiguous_id", None) or {
            c["id"]: i for i, c in enumerate(categories)
        }
        if categories and all("frequency" in c for c in categories):
            out = [""] * num_classes
            for c in categories:
                if id_map.get(c["id"], num_classes) < num_classes:
                    out[id_map[c["id"]]] = c["frequency"]
            return out
    if train_dicts is not None:
        counts = np.zeros(num_classes, dtype=np.int64)
        for d in train_dicts:
            for c in {a["category_id"] for a in d.get("annotations", [])}:
                if 0 <= c < num_classes:
                    counts[c] += 1
        return [frequency_group(int(n)) for n in counts]
    return [""] * num_classes


def feature_health(
    train: BoxFeatures, test: BoxFeatures, num_classes: int, groups: Optional[Sequence[str]] = None
) -> Dict[str, float]:
    """
    Every figure of the probe table from the boxes of a training and a test split (see the module
    doc): ``probe_roi_*`` / ``probe_box_*`` (linear probe on RoI features / box-head embeddings:
    ``top1``, ``balanced``, ``balanced_r/c/f``), ``ncc_box`` (balanced nearest-centroid accuracy),
    ``rank_roi``, ``rank_box``, ``rank_<level>``, ``std_roi``, ``std_box``, ``box_norm``, ``boxes``.
    Box-head figures are NaN when the features have no box-head embeddings.
    """
    nan = float("nan")
    out: Dict[str, float] = {"boxes": float(len(test.classes))}
    for name in ("roi", "box"):
        tr, te = getattr(train, name), getattr(test, name)
        if te.shape[1] == 0 or len(tr) == 0 or len(te) == 0:
            keys = ["top1", "balanced"] + (
                [f"balanced_{g}" for g in "rcf"] if groups is not None else []
            )
            out.update({f"probe_{name}_{k}": nan for k in keys})
            continue
        predicted = linear_probe(tr, train.classes, te, num_classes)
        for key, value in accuracies(predicted, test.classes, groups).items():
            out[f"probe_{name}_{key}"] = value
    has_box = test.box.shape[1] > 0 and len(train.box) > 0
    out["ncc_box"] = (
        accuracies(nearest_centroid(train.box, train.classes, test.box, num_classes), test.classes)[
            "balanced"
        ]
        if has_box
        else nan
    )
    out["rank_roi"] = rankme(test.roi)
    out["rank_box"] = rankme(test.box) if has_box else nan
    for level, f in test.locations.items():
        out[f"rank_{level}"] = rankme(f)
    out["std_roi"] = embedding_std(test.roi)
    out["std_box"] = embedding_std(test.box) if has_box else nan
    out["box_norm"] = float(test.box.norm(dim=1).mean()) if has_box and len(test.box) else nan
    return out


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
# (name, state-dict prefixes) of the stages compared against the random initialisation.
STAGES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("stem", ("backbone.bottom_up.stem.",)),
    ("res2", ("backbone.bottom_up.res2.",)),
    ("res3", ("backbone.bottom_up.res3.",)),
    ("res4", ("backbone.bottom_up.res4.",)),
    ("res5", ("backbone.bottom_up.res5.",)),
    ("fpn", ("backbone.fpn_", "backbone.top_block.")),
    ("rpn", ("proposal_generator.",)),
    ("box_head", ("roi_heads.box_head.",)),
)


def _is_norm_key(name: str, tensor: torch.Tensor) -> bool:
    """A norm layer's affine weight / bias (GN, BN, FrozenBN): 1-d, under a ``norm`` / ``bn``
    module."""
    parts = name.split(".")
    return (
        tensor.dim() == 1
        and len(parts) >= 2
        and ("norm" in parts[-2] or parts[-2].startswith("bn"))
    )


def stage_changes(
    state: Dict[str, torch.Tensor], initial: Dict[str, torch.Tensor]
) -> Dict[str, Dict[str, float]]:
    """
    How far each stage of ``state`` moved from ``initial`` (both state dicts of the same model).

    Returns:
        stage -> {"weight_norm_ratio": ||W|| / ||W0|| over the stage's conv / linear weights,
        "weight_change": ||W - W0|| / ||W0|| (meaningful when ``state`` was trained from this very
        ``initial``), "affine_change": ||a - a0|| / ||a0|| over the norm layers' weights and
        biases}; NaN where the stage has no such tensors in both.
    """
    out = {}
    for stage, prefixes in STAGES:
        sums = {"w": 0.0, "w0": 0.0, "dw": 0.0, "a0": 0.0, "da": 0.0}
        found_w = found_a = False
        for name, w0 in initial.items():
            if (
                not name.startswith(prefixes)
                or name not in state
                or not torch.is_floating_point(w0)
            ):
                continue
            w, w0 = state[name].double().cpu(), w0.double().cpu()
            if w.shape != w0.shape:
                continue
            if _is_norm_key(name, w0) and (name.endswith(".weight") or name.endswith(".bias")):
                sums["a0"] += float((w0**2).sum())
                sums["da"] += float(((w - w0) ** 2).sum())
                found_a = True
            elif w0.dim() >= 2 and name.endswith(".weight"):
                sums["w"] += float((w**2).sum())
                sums["w0"] += float((w0**2).sum())
                sums["dw"] += float(((w - w0) ** 2).sum())
                found_w = True
        nan = float("nan")
        out[stage] = {
            "weight_norm_ratio": math.sqrt(sums["w"] / sums["w0"])
            if found_w and sums["w0"] > 0
            else nan,
            "weight_change": math.sqrt(sums["dw"] / sums["w0"])
            if found_w and sums["w0"] > 0
            else nan,
            "affine_change": math.sqrt(sums["da"] / sums["a0"])
            if found_a and sums["a0"] > 0
            else nan,
        }
    return out
