"""Assessing models: metrics, classical baselines, evaluation, cross-validation, calibration."""
