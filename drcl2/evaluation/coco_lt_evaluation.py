"""
COCO-LT evaluation: detectron2's COCO metrics plus AP1-AP4, the AP of classes grouped by their
number of *training* instances ([1, 20), [20, 400), [400, 8000), [8000, inf)), and the per-class
report.
"""

import json
import logging

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..data.coco_lt import COCO_LT_GROUP_BOUNDS, class_counts, coco_lt_group
from .per_class import write_per_class_report

logger = logging.getLogger(__name__)

__all__ = ["COCOLTEvaluator", "COCO_LT_GROUPS", "group_ap"]

COCO_LT_GROUPS = tuple(f"AP{g}" for g in range(1, len(COCO_LT_GROUP_BOUNDS) + 1))


def group_ap(precision, groups):
    """
    AP of each group of categories, as COCO's AP: the mean of the precision entries > -1 over IoU
    thresholds, recall thresholds and the group's categories (all areas, the largest maxDets).

    Args:
        precision (ndarray[T, R, K, A, M]): ``COCOeval.eval["precision"]``.
        groups (list[int]): group 1..4 of each of the K categories (0: no training instance).

    Returns:
        dict[str, float]: "AP1".."AP4" in percent; NaN for a group without evaluable category.
    """
    s = precision[:, :, :, 0, -1]
    groups = np.asarray(groups)
    out = {}
    for g, name in enumerate(COCO_LT_GROUPS, start=1):
        sg = s[:, :, groups == g]
        sg = sg[sg > -1]
        out[name] = float(np.mean(sg) * 100) if sg.size else float("nan")
    return out


class COCOLTEvaluator(COCOEvaluator):
    """
    :class:`~detectron2.evaluation.COCOEvaluator` whose ``bbox`` / ``segm`` results also have
    AP1-AP4, and which writes ``per_class_ap.csv`` / ``.png`` (AP against training instances) into
    ``output_dir``. The training counts are those of the dataset ``train_dataset_name`` (its
    metadata ``json_file``), by default the evaluated dataset's metadata ``train_dataset_name``.
    """

    def __init__(
        self,
        dataset_name,
        tasks=None,
        distributed=True,
        output_dir=None,
        *,
        max_dets_per_image=None,
        train_dataset_name=None,
        **kwargs,
    ):
        """
        Args:
            dataset_name, tasks, distributed, output_dir, max_dets_per_image, kwargs: as
                :class:`COCOEvaluator`.
            train_dataset_name (str or None): registered dataset whose json gives the training
                counts; None: ``MetadataCatalog.get(dataset_name).train_dataset_name``.
        """
        super().__init__(
            dataset_name,
            tasks,
            distributed,
            output_dir,
            max_dets_per_image=max_dets_per_image,
            **kwargs,
        )
        self._dataset_name = dataset_name
        if train_dataset_name is None:
            train_dataset_name = self._metadata.get("train_dataset_name", None)
        if train_dataset_name is None:
            raise ValueError(
                "COCOLTEvaluator needs the training set for AP1-AP4: pass train_dataset_name or "
                f"set MetadataCatalog.get('{dataset_name}').train_dataset_name (coco_lt_val has "
                "'coco_lt_train')."
            )
        self._train_dataset_name = train_dataset_name
        self._train_counts = None
        self._per_class_ap = {}

    def train_counts(self):
        """{dataset category id: {"image_count", "instance_count"}} of the training set (cached)."""
        if self._train_counts is None:
            json_file = MetadataCatalog.get(self._train_dataset_name).get("json_file", None)
            if json_file is None:
                raise ValueError(
                    f"Training dataset '{self._train_dataset_name}' has no metadata 'json_file'; "
                    "COCOLTEvaluator counts training instances from it."
                )
            if not PathManager.exists(json_file):
                raise FileNotFoundError(
                    f"{json_file} (training set '{self._train_dataset_name}') does not exist; "
                    "create it with `python datasets/prepare_coco_lt.py` (see datasets/README.md, "
                    "COCO-LT)."
                )
            with PathManager.open(json_file) as f:
                self._train_counts = class_counts(json.load(f))
        return self._train_counts

    def reset(self):
        super().reset()
        self._per_class_ap = {}

    def _category_ids(self):
        id_map = self._metadata.thing_dataset_id_to_contiguous_id
        return sorted(id_map, key=id_map.__getitem__)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if iou_type not in ("bbox", "segm"):
            return results
        if coco_eval is None:
            results.update({name: float("nan") for name in COCO_LT_GROUPS})
            return results
        counts = self.train_counts()
        cat_ids = coco_eval.params.catIds
        missing = [c for c in cat_ids if c not in counts]
        if missing:
            raise ValueError(
                f"Categories {missing[:10]} of '{self._dataset_name}' are not in the training set "
                f"'{self._train_dataset_name}'; both must share COCO's category ids."
            )
        precision = coco_eval.eval["precision"]
        groups = [coco_lt_group(counts[c]["instance_count"]) for c in cat_ids]
        grouped = group_ap(precision, groups)
        self._logger.info(
            f"COCO-LT groups for {iou_type}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in grouped.items())
        )
        results.update(grouped)
        s = precision[:, :, :, 0, -1]
        valid = s > -1
        with np.errstate(invalid="ignore"):
            ap = np.where(valid, s, 0).sum(axis=(0, 1)) / valid.sum(axis=(0, 1)) * 100
        self._per_class_ap[iou_type] = dict(zip(cat_ids, ap.tolist()))
        return results

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if self._output_dir and self._per_class_ap and comm.is_main_process():
            write_per_class_report(
                self.per_class_rows(),
                self._output_dir,
                x_key="train_instance_count",
                x_label="training instances per class",
                title=f"{self._dataset_name}: per-class AP (groups by training instances)",
                group_order=COCO_LT_GROUPS,
            )
        return results

    def per_class_rows(self):
        """Rows of the per-class report: class, AP1-AP4 group, training images / instances, APs."""
        counts = self.train_counts()
        names = self._metadata.thing_classes
        rows = []
        for k, cat_id in enumerate(self._category_ids()):
            c = counts.get(cat_id, {"image_count": 0, "instance_count": 0})
            group = coco_lt_group(c["instance_count"])
            rows.append(
                {
                    "class": names[k],
                    "frequency_group": f"AP{group}" if group else "",
                    "train_image_count": c["image_count"],
                    "train_instance_count": c["instance_count"],
                    "ap_box": self._per_class_ap.get("bbox", {}).get(cat_id, float("nan")),
                    "ap_mask": self._per_class_ap.get("segm", {}).get(cat_id, float("nan")),
                }
            )
        return rows
