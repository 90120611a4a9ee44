"""
A dataset checked before the first training step: what would stop a run mid-way, and what detectron2
would drop without a word.

:func:`check_dataset_dicts` checks detectron2 dataset dicts (any registered dataset, as its loader
returns them) and returns a :class:`DatasetReport`. Each finding is counted, with the first case
named (file, annotation id):

Errors (the dataset cannot be trained or evaluated as it is: drcl2's Trainer refuses to start,
``python -m drcl2.tools.check_dataset`` exits with status 1):

* ``missing_file``: an image file that does not exist;
* ``unknown_category``: a category id outside the dataset's classes (``thing_classes``; for an
  LVIS-format json, a ``category_id`` not in ``categories`` is already refused when it is loaded);
* ``malformed_box``: a box that is not four finite numbers;
* with ``decode_images``: ``undecodable``, an image that cannot be decoded (truncated, not an
  image), and ``size_mismatch``, an image whose decoded size (after EXIF rotation, as detectron2
  reads it) differs from the dict's ``height`` / ``width`` (detectron2's mapper raises on it
  mid-run).

Warnings (training goes on; logged with their counts):

* ``negative_size``, ``zero_area``, ``outside_image``: boxes with a negative width or height, a zero
  one (<= 1e-5 px), or nothing left once clipped to the image. detectron2 clips every training box
  to the image (``transform_instance_annotations``) and then drops the empty ones
  (``filter_empty_instances``, threshold 1e-5): these annotations are not trained on. An image left
  with no box still trains, as background. (Evaluation keeps them as ground truth no detection can
  match.)
* ``clipped``: boxes that reach outside the image and are clipped to it (kept).

Existence is checked with one directory listing (``os.scandir``) per image folder rather than one
``stat`` per file (LVIS train: 100k images in one folder, one listing); paths that are not local
(``scheme://...``) are asked one by one through detectron2's ``PathManager``. Decoding is opt-in: it
reads every image (``num_workers`` processes).
"""

import logging
import multiprocessing
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetCheckError",
    "DatasetReport",
    "Finding",
    "check_dataset_dicts",
    "check_datasets",
    "ERRORS",
    "WARNINGS",
]

# kind -> (what is counted, what it is, what happens to it); errors first, in report order.
ERRORS = {
    "missing_file": ("image", "missing image files", ""),
    "unknown_category": ("annotation", "category ids outside the dataset's classes", ""),
    "malformed_box": ("annotation", "boxes that are not four finite numbers", ""),
    "undecodable": ("image", "images that cannot be decoded (truncated, or not an image)", ""),
    "size_mismatch": ("image", "images whose decoded size differs from their height / width", ""),
}
WARNINGS = {
    "negative_size": (
        "annotation",
        "boxes with a negative width or height",
        "dropped for training, as detectron2 drops empty boxes",
    ),
    "zero_area": (
        "annotation",
        "boxes of zero area",
        "dropped for training, as detectron2 drops empty boxes",
    ),
    "outside_image": (
        "annotation",
        "boxes entirely outside the image",
        "dropped for training: detectron2 clips boxes to the image and drops empty ones",
    ),
    "clipped": (
        "annotation",
        "boxes reaching outside the image",
        "clipped to the image, as detectron2 does",
    ),
}

# detectron2's filter_empty_instances: a box is empty when a side is <= this (pixels)
EMPTY_BOX_THRESHOLD = 1e-5


class DatasetCheckError(ValueError):
    """A dataset has errors (see :class:`DatasetReport`); the message is the full report."""


# cases a report line names (every case is kept in Finding.cases; check_dataset --all prints them)
NAMED_CASES = 5


@dataclass
class Finding:
    """One kind of problem: how many annotations / images, and every case (file, annotation id)."""

    kind: str
    count: int = 0
    images: set = field(default_factory=set)
    cases: List[str] = field(default_factory=list)
    values: set = field(default_factory=set)  # e.g. the unknown category ids

    @property
    def first(self) -> str:
        return self.cases[0] if self.cases else ""

    def add(self, image_key, where, value=None):
        self.count += 1
        self.images.add(image_key)
        self.cases.append(where)
        if value is not None:
            self.values.add(value)

    def named(self, limit: Optional[int] = NAMED_CASES) -> str:
        """The cases, the first ``limit`` of them (None: all) and how many more."""
        shown = self.cases if limit is None else self.cases[:limit]
        more = len(self.cases) - len(shown)
        return "; ".join(shown) + (f"; and {more} more" if more else "")


@dataclass
class DatasetReport:
    """The findings of :func:`check_dataset_dicts` on one dataset (or one concatenation of them)."""

    source: str
    num_images: int = 0
    num_annotations: int = 0
    findings: Dict[str, Finding] = field(default_factory=dict)
    decoded: bool = False
    num_classes: Optional[int] = None

    def add(self, kind, image_key, where, value=None):
        self.findings.setdefault(kind, Finding(kind)).add(image_key, where, value)

    @property
    def errors(self) -> List[Finding]:
        return [self.findings[k] for k in ERRORS if k in self.findings]

    @property
    def warnings(self) -> List[Finding]:
        return [self.findings[k] for k in WARNINGS if k in self.findings]

    def lines(self, limit: Optional[int] = NAMED_CASES) -> List[str]:
        """
        One line per finding, errors first, naming the first ``limit`` cases (None: all), e.g.
        "warning: boxes of zero area: 12 annotations in 9 images; dropped for training, ...
        (a.jpg, annotation id 3; b.jpg, annotation id 7; ...; and 7 more)".
        """
        out = []
        for level, kinds in (("error", ERRORS), ("warning", WARNINGS)):
            for kind, (unit, what, consequence) in kinds.items():
                f = self.findings.get(kind)
                if f is None:
                    continue
                if kind == "unknown_category" and self.num_classes is not None:
                    what = f"{what} (contiguous ids 0..{self.num_classes - 1})"
                values = f" {sorted(f.values, key=str)[:10]}" if f.values else ""
                counted = _plural(f.count, unit) + (
                    f" in {_plural(len(f.images), 'image')}" if unit == "annotation" else ""
                )
                then = f"; {consequence}" if consequence else ""
                out.append(f"{level}: {what}{values}: {counted}{then} ({f.named(limit)})")
        return out

    def summary(self, limit: Optional[int] = NAMED_CASES) -> str:
        """The report: a head line, then :meth:`lines` (``limit`` cases named per finding)."""
        checked = "files, categories and boxes" + (", decoded images" if self.decoded else "")
        kinds = f"{_plural(len(self.errors), 'kind')} of error, "
        kinds += f"{_plural(len(self.warnings), 'kind')} of warning"
        head = (
            f"{self.source}: {_plural(self.num_images, 'image')}, "
            f"{_plural(self.num_annotations, 'annotation')}; checked {checked}: {kinds}."
        )
        return "\n".join([head] + ["  " + line for line in self.lines(limit)])

    def raise_if_errors(self, hint: str = "") -> None:
        """Raise :class:`DatasetCheckError` (the summary, and ``hint``) if there are errors."""
        if self.errors:
            raise DatasetCheckError(self.summary() + (f"\n{hint}" if hint else ""))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _existing(folder: str) -> Optional[set]:
    """Names in a local ``folder`` (one listing); empty if it does not exist; None if not local."""
    if "://" in folder:
        return None
    try:
        with os.scandir(folder or ".") as entries:
            return {e.name for e in entries}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _missing_files(file_names: Iterable[str]) -> List[str]:
    by_folder = defaultdict(list)
    for f in file_names:
        by_folder[os.path.dirname(f)].append(f)
    missing = []
    for folder, files in by_folder.items():
        names = _existing(folder)
        if names is None:
            missing += [f for f in files if not PathManager.exists(f)]
        else:
            missing += [f for f in files if os.path.basename(f) not in names]
    return missing


def _annotation_name(record: Dict[str, Any], index: int, ann: Dict[str, Any]) -> str:
    ann_id = f"annotation id {ann['id']}" if "id" in ann else f"annotation {index} of the image"
    return f"{record.get('file_name', record.get('image_id'))}, {ann_id}"


def _box_array(boxes: List[Any]):
    """
    Boxes as an array [N, 4] (float64) and a mask [N] of the malformed ones (not four finite
    numbers; their rows are 0). The loop over single boxes runs only when the fast path fails.
    """
    try:
        arr = np.asarray(boxes, dtype=np.float64).reshape(len(boxes), 4)
    except (TypeError, ValueError):
        arr = np.zeros((len(boxes), 4))
        for k, box in enumerate(boxes):
            try:
                arr[k] = np.asarray(box, dtype=np.float64).reshape(4)
            except (TypeError, ValueError):
                arr[k] = np.nan
    malformed = ~np.isfinite(arr).all(axis=1)
    arr[malformed] = 0
    return arr, malformed


def _check_boxes(
    report: DatasetReport, dataset_dicts: Sequence[Dict[str, Any]], num_classes: Optional[int]
):
    """Category ids and boxes of every annotation, classified as detectron2's training mapper treats
    them."""
    refs = [
        (i, j) for i, r in enumerate(dataset_dicts) for j in range(len(r.get("annotations", ())))
    ]
    report.num_annotations = len(refs)
    if not refs:
        return
    anns = [dataset_dicts[i]["annotations"][j] for i, j in refs]

    def name(k):
        i, j = refs[k]
        return _annotation_name(dataset_dicts[i], j, anns[k])

    if num_classes is not None:
        cats = [a.get("category_id") for a in anns]
        try:
            ids = np.asarray(cats, dtype=np.int64)
            exact = np.asarray(cats, dtype=np.float64) == ids  # 1.5 is not a category
        except (TypeError, ValueError):
            ids, exact = np.full(len(cats), -1), np.zeros(len(cats), dtype=bool)
        for k in np.flatnonzero(~exact | (ids < 0) | (ids >= num_classes)):
            report.add("unknown_category", refs[k][0], name(k), cats[k])

    has_box = np.asarray(
        [a.get("bbox") is not None for a in anns]
    )  # a segmentation-only annotation has none
    boxes, malformed = _box_array(
        [a["bbox"] if a.get("bbox") is not None else (0, 0, 0, 0) for a in anns]
    )
    malformed &= has_box
    for k in np.flatnonzero(malformed):
        report.add("malformed_box", refs[k][0], name(k))
    modes = np.fromiter(
        (a.get("bbox_mode", BoxMode.XYWH_ABS) for a in anns), dtype=np.int64, count=len(anns)
    )
    xyxy = boxes.copy()
    for mode in np.unique(modes):
        if mode != BoxMode.XYXY_ABS:
            rows = modes == mode
            xyxy[rows] = BoxMode.convert(boxes[rows], BoxMode(int(mode)), BoxMode.XYXY_ABS)
    image_sizes = np.asarray(
        [(r.get("width", np.inf), r.get("height", np.inf)) for r in dataset_dicts], dtype=np.float64
    )
    sizes = image_sizes[np.asarray([i for i, _ in refs])]
    w, h = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    # detectron2's transform_instance_annotations: clip to [0, width] x [0, height]
    clipped = np.stack(
        [
            np.maximum(xyxy[:, 0], 0),
            np.maximum(xyxy[:, 1], 0),
            np.minimum(xyxy[:, 2], sizes[:, 0]),
            np.minimum(xyxy[:, 3], sizes[:, 1]),
        ],
        axis=1,
    )
    # ... then filter_empty_instances: a side <= the threshold
    empty_after_clip = ((clipped[:, 2] - clipped[:, 0]) <= EMPTY_BOX_THRESHOLD) | (
        (clipped[:, 3] - clipped[:, 1]) <= EMPTY_BOX_THRESHOLD
    )
    checked = has_box & ~malformed
    negative = checked & ((w < 0) | (h < 0))
    zero = checked & ~negative & ((w <= EMPTY_BOX_THRESHOLD) | (h <= EMPTY_BOX_THRESHOLD))
    outside = checked & ~negative & ~zero & empty_after_clip
    reaching_out = checked & ~negative & ~zero & ~outside & np.any(clipped != xyxy, axis=1)
    for kind, mask in (
        ("negative_size", negative),
        ("zero_area", zero),
        ("outside_image", outside),
        ("clipped", reaching_out),
    ):
        for k in np.flatnonzero(mask):
            report.add(kind, refs[k][0], name(k))


def _decode(item):
    """(index, file, height, width) -> (index, kind or None, detail)."""
    i, file_name, height, width = item
    try:
        image = read_image(file_name)
    except Exception as e:  # any decoder failure: PIL raises OSError, SyntaxError, ValueError, ...
        return i, "undecodable", f"{file_name}: {type(e).__name__}: {e}"
    got = (image.shape[1], image.shape[0])
    if height is not None and width is not None and got != (width, height):
        return (
            i,
            "size_mismatch",
            f"{file_name}: decoded {got[0]}x{got[1]}, the dataset says {width}x{height}",
        )
    return i, None, ""


def _check_images(report, dataset_dicts, present, num_workers):
    items = [
        (i, r["file_name"], r.get("height"), r.get("width"))
        for i, r in enumerate(dataset_dicts)
        if i in present
    ]
    if num_workers > 1 and len(items) > 1:
        with multiprocessing.Pool(num_workers) as pool:  # forked, like the DataLoader workers
            results = list(
                pool.imap(_decode, items, chunksize=max(1, len(items) // (8 * num_workers)))
            )
    else:
        results = [_decode(item) for item in items]
    for i, kind, detail in results:
        if kind is not None:
            report.add(kind, i, detail)


def check_dataset_dicts(
    dataset_dicts: Sequence[Dict[str, Any]],
    *,
    source: str = "dataset",
    num_classes: Optional[int] = None,
    decode_images: bool = False,
    num_workers: int = 0,
) -> DatasetReport:
    """
    Check detectron2 dataset dicts (see the module docstring for what is checked).

    Args:
        dataset_dicts (list[dict]): detectron2's format (``file_name``, ``height``, ``width``,
            ``annotations`` with ``bbox``, ``bbox_mode``, ``category_id`` contiguous in [0, K)).
        source (str): the dataset, for the report.
        num_classes (int or None): K, the number of classes; None skips the category check.
        decode_images (bool): also decode every image (slow: the whole dataset is read).
        num_workers (int): processes for decoding (<= 1: this process).

    Returns:
        DatasetReport
    """
    report = DatasetReport(
        source, num_images=len(dataset_dicts), decoded=decode_images, num_classes=num_classes
    )
    with_file = [i for i, r in enumerate(dataset_dicts) if "file_name" in r]
    missing = set(_missing_files(dataset_dicts[i]["file_name"] for i in with_file))
    for i in with_file:
        if dataset_dicts[i]["file_name"] in missing:
            report.add("missing_file", i, dataset_dicts[i]["file_name"])
    _check_boxes(report, dataset_dicts, num_classes)
    if decode_images:
        present = {i for i in with_file if dataset_dicts[i]["file_name"] not in missing}
        _check_images(report, dataset_dicts, present, num_workers)
    return report


def _num_classes(dataset_names: Sequence[str]) -> Optional[int]:
    classes = MetadataCatalog.get(dataset_names[0]).get("thing_classes", None)
    return len(classes) if classes is not None else None


def log_report(report: DatasetReport) -> None:
    """Log a report: a warning when it has findings, else one info line."""
    if report.findings:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())


# Datasets already checked in this process, by (name, loader): build_test_loader runs at every
# evaluation, and the test sets were checked when the Trainer started.
_CHECKED = set()


def check_datasets(
    dataset_names: Sequence[str],
    dataset_dicts: Optional[Sequence[Dict[str, Any]]] = None,
    *,
    decode_images: bool = False,
    num_workers: int = 0,
    hint: str = "",
) -> List[DatasetReport]:
    """
    Check registered datasets, log each report, and raise on errors.

    Args:
        dataset_names (list[str]): registered datasets.
        dataset_dicts (list[dict] or None): their dicts, already loaded (e.g. the training set,
            concatenated and filtered by ``get_detection_dataset_dicts``): checked as one report.
            None: each dataset is loaded (``DatasetCatalog.get``) and checked on its own, once per
            process.
        decode_images, num_workers: as :func:`check_dataset_dicts`.
        hint (str): appended to the error, e.g. where the datasets are documented.

    Returns:
        list[DatasetReport]: the reports made (none for datasets already checked).

    Raises:
        DatasetCheckError: a dataset has errors (the message is its report).
    """
    dataset_names = list(dataset_names)
    if not dataset_names:
        return []
    if dataset_dicts is not None:
        groups = [(dataset_names, dataset_dicts, None)]
    else:
        groups = []
        for name in dataset_names:
            key = (name, DatasetCatalog[name], decode_images)
            if key not in _CHECKED:
                groups.append(([name], DatasetCatalog.get(name), key))
    reports = []
    for names, dicts, key in groups:
        source = f"dataset '{names[0]}'" if len(names) == 1 else f"datasets {names}"
        report = check_dataset_dicts(
            dicts,
            source=source,
            num_classes=_num_classes(names),
            decode_images=decode_images,
            num_workers=num_workers,
        )
        log_report(report)
        report.raise_if_errors(hint)
        if key is not None:
            _CHECKED.add(key)
        reports.append(report)
    return reports
