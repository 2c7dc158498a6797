"""Calibration runs and the metrics that rank layers and experts."""
