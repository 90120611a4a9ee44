"""
drcl2's helpers outside the data path and the model (import the module you need):

    seeding            seeds derived from a run's seed (the images', each step's, the draws')
    visualize          pictures of the two pre-training views (boxes, masked patches) and of a
                       detector's predictions (python -m drcl2.tools.visualize, VIS_PERIOD)
"""
