"""Fitting models: the segmentation net, the forest, cross-validation folds, whole profiles."""
