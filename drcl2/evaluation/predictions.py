"""
Columnar detection predictions: what :class:`drcl2.evaluation.LVISEvaluator` keeps per image, the
predictions file it writes, and the fast writers.

detectron2's evaluators keep, per image, a list of one dict per detection
(``instances_to_coco_json``: Python floats, a pycocotools RLE per mask) and ``torch.save`` that
list of lists at the end (pickling millions of small objects). Here each image keeps a few arrays
instead (:func:`instances_to_columns`), masks are RLE-encoded over the columns their box spans
(:func:`encode_masks`, byte-identical to pycocotools), and the predictions file holds one tensor per
field (:func:`save_predictions`); :func:`load_predictions` gives back exactly detectron2's list.
"""

import json
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = [
    "PREDICTIONS_FORMAT",
    "columns_from_coco_json",
    "columns_to_coco_json",
    "dump_json",
    "encode_masks",
    "instances_to_columns",
    "load_predictions",
    "save_predictions",
]

PREDICTIONS_FORMAT = "drcl2.columnar_predictions.v1"


def encode_masks(masks, boxes_xyxy=None, pixel_counts=None) -> List[bytes]:
    """
    Compressed COCO RLE counts of each mask, byte-identical to
    ``pycocotools.mask.encode(np.asfortranarray(mask[:, :, None]))[0]["counts"]``.

    The runs of a mask (column-major) are read inside its box only (plus 2 pixels each side):
    outside it they are zeros that need no reading, and the RLE's zero runs are lengthened by the
    rows and columns skipped. Each mask's pixel count is checked against the ones found; a mask
    with pixels outside its box is read whole instead, so the boxes are a hint, never a condition.
    The counts are taken on a second thread (OpenCV, without the GIL) while the windows are encoded.

    Args:
        masks (Tensor or ndarray[N, H, W]): bool or uint8 (0 / 1), on the CPU.
        boxes_xyxy (Tensor or ndarray[N, 4] or None): each mask's box (XYXY, pixels).
        pixel_counts (array[N] or None): each mask's number of pixels, when known (e.g. counted
            on the GPU before the masks came to the CPU); counted here otherwise.

    Returns:
        list[bytes]: N compressed counts strings (the "counts" of a COCO RLE of size [H, W]).
    """
    import cv2
    from pycocotools import _mask

    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    m = np.ascontiguousarray(masks)
    if m.dtype == np.bool_:
        m = m.view(np.uint8)
    elif m.dtype != np.uint8:
        m = (m != 0).astype(np.uint8)
    n, h, w = m.shape
    if n == 0:
        return []
    whole = np.array([[0, 0, w, h]] * n, dtype=np.int64)
    if boxes_xyxy is None or h * w == 0:
        windows = whole
    else:
        b = (
            boxes_xyxy.detach().cpu().numpy()
            if isinstance(boxes_xyxy, torch.Tensor)
            else np.asarray(boxes_xyxy)
        )
        b = np.nan_to_num(b.astype(np.float64).reshape(n, 4), nan=0.0, posinf=max(h, w), neginf=0.0)
        lo = np.floor(b[:, :2]) - 2
        hi = np.ceil(b[:, 2:]) + 2
        windows = np.concatenate([np.clip(lo, 0, [w, h]), np.clip(hi, 0, [w, h])], axis=1).astype(
            np.int64
        )
        windows[:, 2:] = np.maximum(windows[:, 2:], windows[:, :2])
    counting = None
    if pixel_counts is None:
        # Counting reads every mask whole (memory-bound, GIL released): on a second thread, while
        # this one encodes the windows.
        counting = _counter().submit(lambda: [cv2.countNonZero(m[i]) for i in range(n)])
    counts, ones = _window_counts(m, windows)
    if counting is not None:
        pixel_counts = counting.result()
    pixel_counts = np.asarray(pixel_counts, dtype=np.int64).reshape(n)
    missed = np.flatnonzero(ones != pixel_counts)  # pixels outside the box: read the whole mask
    if len(missed):
        redo, _ = _window_counts(m[missed], whole[missed])
        for i, c in zip(missed, redo):
            counts[i] = c
    rles = _mask.frUncompressedRLE([{"size": [h, w], "counts": c} for c in counts], h, w)
    return [r["counts"] for r in rles]


_COUNTER = None


def _counter():
    """One worker thread for :func:`encode_masks`' pixel counts (created on first use)."""
    global _COUNTER
    if _COUNTER is None:
        from concurrent.futures import ThreadPoolExecutor

        _COUNTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drcl2-mask-count")
    return _COUNTER


def _window_counts(m: np.ndarray, windows: np.ndarray):
    """
    Uncompressed RLE counts (uint32, column-major, starting with a zero run) of each mask m[i] of
    [N, H, W] that is zero outside ``windows[i]`` = (x0, y0, x1, y1), reading the window only; and
    the number of ones found in each window.

    Each window is transposed (cv2) into one buffer, column after column, followed by one zero
    that stands for the pixel after the column (row y1, or the top of the next column when the
    window is as tall as the image; then one zero after the window instead): every buffer element
    is then a pixel of the image, in column-major order, and the pixels skipped between two of
    them are zeros. So the value changes in the buffer are the mask's, at known pixel indices, and
    the RLE counts are the differences of those indices.
    """
    import cv2

    n, h, w = m.shape
    x0, y0, x1, y1 = windows.T
    wb, hb = x1 - x0, y1 - y0
    nonempty = (wb > 0) & (hb > 0)
    padded = (hb < h) & nonempty
    col = hb + padded  # buffer length of one column
    lengths = (wb * col + (nonempty & ~padded)) * nonempty
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buf = np.zeros(int(offsets[-1]), np.uint8)
    for i, (a, b, c, d, o) in enumerate(
        zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(), offsets.tolist())
    ):
        if a == c or b == d:
            continue
        # cv2 writes straight into the strided view; the zero after each column stays 0.
        cols = buf[o : o + (c - a) * (d - b + (d - b < h))].reshape(c - a, -1)[:, : d - b]
        out = cv2.transpose(m[i, b:d, a:c], cols)
        if not np.shares_memory(out, cols):  # pragma: no cover - cv2 gave a new array after all
            cols[...] = out
    # A change at p: buf[p] differs from the pixel before it (0 before a window's first element).
    change = np.empty(buf.size, bool)
    if buf.size:
        change[0] = buf[0] != 0
        np.not_equal(buf[1:], buf[:-1], out=change[1:])
        firsts = offsets[:-1][lengths > 0]
        change[firsts] = buf[firsts] != 0
    p = np.flatnonzero(change)
    owner = np.searchsorted(offsets, p, side="right") - 1
    q, r = np.divmod(p - offsets[owner], col[owner])
    t = (x0[owner] + q) * h + y0[owner] + r  # pixel index (column-major) where the new run starts
    # Changes alternate 0 -> 1, 1 -> 0 and every window ends on a zero: the ones are the sum of
    # the 1 -> 0 indices minus the 0 -> 1 ones.
    rising = buf[p] != 0
    ones = np.bincount(owner, weights=np.where(rising, -t, t), minlength=n).round().astype(np.int64)
    # counts = differences of [0, changes..., H * W]; a change at H * W (the zero after a last
    # column that ends the image) ends nothing.
    keep = t < h * w
    t, owner = t[keep], owner[keep]
    k = np.bincount(owner, minlength=n)
    ends = np.cumsum(k + 2)
    starts = ends - (k + 2)
    seq = np.zeros(int(ends[-1]) if n else 0, np.int64)
    seq[ends - 1] = h * w
    rank = np.arange(len(t)) - (np.cumsum(k) - k)[owner]
    seq[starts[owner] + 1 + rank] = t
    diffs = np.diff(seq).astype(np.uint32)
    return [diffs[s : s + c] for s, c in zip(starts.tolist(), (k + 1).tolist())], ones


def instances_to_columns(instances, with_masks: Optional[bool] = None, pixel_counts=None) -> Dict:
    """
    One image's ``Instances`` (pred_boxes, scores, pred_classes, optional pred_masks; on the CPU) as
    columns: ``boxes`` float32 [N, 4] XYWH, ``scores`` float32 [N], ``classes`` int64 [N] (the
    model's contiguous ids), ``rles`` (list of N compressed counts, or None) and ``mask_size``
    ([H, W] of the masks, or None). The same numbers as detectron2's ``instances_to_coco_json``.
    ``pixel_counts``: each mask's pixel count, when already known (see :func:`encode_masks`).
    """
    n = len(instances)
    boxes = (
        instances.pred_boxes.tensor.detach()
        .cpu()
        .numpy()
        .astype(np.float32, copy=True)
        .reshape(n, 4)
    )
    xyxy = boxes.copy()
    boxes[:, 2:] -= boxes[:, :2]  # BoxMode.convert(XYXY_ABS -> XYWH_ABS) in float32, as detectron2
    has_mask = instances.has("pred_masks") if with_masks is None else with_masks
    rles, size = None, None
    if has_mask:
        masks = instances.pred_masks
        size = [int(s) for s in masks.shape[-2:]]
        rles = encode_masks(masks, xyxy, pixel_counts)
    return {
        "boxes": boxes,
        "scores": instances.scores.detach().cpu().numpy().astype(np.float32, copy=False).reshape(n),
        "classes": instances.pred_classes.detach()
        .cpu()
        .numpy()
        .astype(np.int64, copy=False)
        .reshape(n),
        "rles": rles,
        "mask_size": size,
    }


def columns_to_coco_json(columns: Dict, image_id, category_ids=None) -> List[Dict]:
    """
    detectron2's ``instances_to_coco_json`` output from columns: a list of dicts with image_id,
    category_id, bbox (XYWH), score and, with masks, segmentation ({"size", "counts": str}).

    Args:
        category_ids (ndarray or None): replaces ``columns["classes"]`` (e.g. mapped to dataset
        ids).
    """
    classes = (columns["classes"] if category_ids is None else category_ids).tolist()
    boxes = columns["boxes"].tolist()
    scores = columns["scores"].tolist()
    rles = columns.get("rles")
    if rles is None:
        return [
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(classes, boxes, scores)
        ]
    size = columns["mask_size"]
    return [
        {
            "image_id": image_id,
            "category_id": c,
            "bbox": b,
            "score": s,
            "segmentation": {"size": list(size), "counts": r.decode("utf-8")},
        }
        for c, b, s, r in zip(classes, boxes, scores, rles)
    ]


def columns_from_coco_json(results: List[Dict]) -> Dict:
    """Columns (as :func:`instances_to_columns`) of one image's detectron2-format detection
    dicts."""
    n = len(results)
    has_mask = n > 0 and "segmentation" in results[0]
    rles, size = None, None
    if has_mask:
        rles = [r["segmentation"]["counts"] for r in results]
        rles = [c.encode("utf-8") if isinstance(c, str) else bytes(c) for c in rles]
        size = [int(s) for s in results[0]["segmentation"]["size"]]
    return {
        "boxes": np.array([r["bbox"] for r in results], dtype=np.float32).reshape(n, 4),
        "scores": np.array([r["score"] for r in results], dtype=np.float32).reshape(n),
        "classes": np.array([r["category_id"] for r in results], dtype=np.int64).reshape(n),
        "rles": rles,
        "mask_size": size,
    }


def save_predictions(predictions: List[Dict], path: str) -> None:
    """
    Write the predictions (``[{"image_id", "instances": columns, ["proposals": Instances]}, ...]``)
    as one dict of tensors with ``torch.save``: loadable with ``torch.load(path)`` (weights_only
    too) and, in detectron2's format, with :func:`load_predictions`. Keys: ``format``,
    ``image_ids`` [I], ``num_instances`` [I], ``boxes`` [D, 4] XYWH float32, ``scores`` [D],
    ``classes`` [D] (model's contiguous ids, as detectron2's file), ``mask_sizes`` [I, 2] (-1: no
    masks), ``rle_counts`` (uint8, all compressed RLE counts one after another), ``rle_offsets``
    [D + 1]; ``proposals``: the list of per-image proposals, where there are any.
    """
    from detectron2.utils.file_io import PathManager

    columns = [p.get("instances") for p in predictions]
    empty = {
        "boxes": np.zeros((0, 4), np.float32),
        "scores": np.zeros(0, np.float32),
        "classes": np.zeros(0, np.int64),
        "rles": None,
        "mask_size": None,
    }
    columns = [empty if c is None else c for c in columns]
    rles = [r for c in columns for r in (c["rles"] or [b""] * len(c["scores"]))]
    lengths = np.fromiter((len(r) for r in rles), dtype=np.int64, count=len(rles))
    offsets = np.zeros(len(rles) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = {
        "format": PREDICTIONS_FORMAT,
        "image_ids": torch.as_tensor([p["image_id"] for p in predictions], dtype=torch.int64),
        "has_instances": torch.as_tensor([p.get("instances") is not None for p in predictions]),
        "num_instances": torch.as_tensor([len(c["scores"]) for c in columns], dtype=torch.int64),
        "boxes": torch.from_numpy(
            np.concatenate([c["boxes"] for c in columns])
            if columns
            else np.zeros((0, 4), np.float32)
        ),
        "scores": torch.from_numpy(
            np.concatenate([c["scores"] for c in columns]) if columns else np.zeros(0, np.float32)
        ),
        "classes": torch.from_numpy(
            np.concatenate([c["classes"] for c in columns]) if columns else np.zeros(0, np.int64)
        ),
        "mask_sizes": torch.as_tensor(
            [c["mask_size"] or [-1, -1] for c in columns], dtype=torch.int64
        ).reshape(-1, 2),
        "rle_counts": torch.frombuffer(bytearray(b"".join(rles)), dtype=torch.uint8)
        if offsets[-1]
        else torch.zeros(0, dtype=torch.uint8),
        "rle_offsets": torch.from_numpy(offsets),
    }
    if any("proposals" in p for p in predictions):
        data["proposals"] = [p.get("proposals") for p in predictions]
    with PathManager.open(path, "wb") as f:
        torch.save(data, f)


def load_predictions(path: str) -> List[Dict]:
    """
    A predictions file as detectron2's evaluators keep it: ``[{"image_id", "instances": [dict per
    detection as instances_to_coco_json, category ids as the model's contiguous ids]}, ...]``.
    Reads drcl2's columnar file (:func:`save_predictions`) and detectron2's own (a pickled list).
    """
    from detectron2.utils.file_io import PathManager

    with PathManager.open(path, "rb") as f:
        data = torch.load(f, weights_only=False)
    if isinstance(data, list):
        return data
    if not (isinstance(data, dict) and data.get("format") == PREDICTIONS_FORMAT):
        raise ValueError(
            f"{path}: neither a detectron2 predictions list nor a {PREDICTIONS_FORMAT} file."
        )
    counts = data["num_instances"].tolist()
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    blob = data["rle_counts"].numpy().tobytes()
    offsets = data["rle_offsets"].numpy()
    boxes, scores, classes = data["boxes"].numpy(), data["scores"].numpy(), data["classes"].numpy()
    proposals = data.get("proposals")
    out = []
    for k, image_id in enumerate(data["image_ids"].tolist()):
        lo, hi = int(starts[k]), int(starts[k + 1])
        prediction = {"image_id": image_id}
        if bool(data["has_instances"][k]):
            size = data["mask_sizes"][k].tolist()
            columns = {
                "boxes": boxes[lo:hi],
                "scores": scores[lo:hi],
                "classes": classes[lo:hi],
                "rles": None
                if size[0] < 0
                else [blob[offsets[j] : offsets[j + 1]] for j in range(lo, hi)],
                "mask_size": None if size[0] < 0 else size,
            }
            prediction["instances"] = columns_to_coco_json(columns, image_id)
        if proposals is not None and proposals[k] is not None:
            prediction["proposals"] = proposals[k]
        out.append(prediction)
    return out


def dump_json(obj, path: str) -> None:
    """``json.dump`` of ``obj`` to ``path``, with orjson when it is installed (10x faster; floats
    written in their shortest round-trip form, as Python's json, but exponents as ``1e-5``)."""
    from detectron2.utils.file_io import PathManager

    try:
        import orjson
    except (
        ImportError
    ):  # pragma: no cover - orjson is a dependency; the fallback keeps old installs working
        with PathManager.open(path, "w") as f:
            f.write(json.dumps(obj))
        return
    data = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    with PathManager.open(path, "wb") as f:
        f.write(data)
