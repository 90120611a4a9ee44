"""A written test image with known coloured boxes, its dataset dict, and a fixed crop, for the
mapper and proposal tests."""

import numpy as np
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


BOXES = [(8, 8, 40, 40), (60, 10, 100, 50), (20, 70, 70, 110), (90, 80, 120, 120)]


def write_image(tmp_path):
    import cv2

    image = np.full((128, 128, 3), 128, np.uint8)
    for (x0, y0, x1, y1), c in zip(BOXES, COLOURS):
        image[y0:y1, x0:x1] = c  # BGR as written by cv2
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, image)
    return path, image


def record(path):
    return {
        "file_name": path,
        "image_id": 1,
        "height": 128,
        "width": 128,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": i, "iscrowd": 0}
            for i, b in enumerate(BOXES)
        ]
        + [{"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 7, "iscrowd": 1}],
    }


class FixedCrop(T.Augmentation):
    def __init__(self, x0, y0, w, h):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return T.CropTransform(self.x0, self.y0, self.w, self.h)
