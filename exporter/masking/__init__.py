"""Calibration data and statistics, unit scores, persona masks, steering and compensation biases."""
