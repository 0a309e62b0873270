"""Training support: synthetic data, datasets, training, evaluation and calibration of the models."""
