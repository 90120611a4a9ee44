"""
drcl2's helpers outside the data path and the model.

    visualize          pictures of the two pre-training views (boxes, masked patches) and of a
                       detector's predictions (python -m drcl2.tools.visualize, VIS_PERIOD)
"""

from .visualize import draw_predictions, draw_two_views, views_pictures

__all__ = ["draw_two_views", "draw_predictions", "views_pictures"]
