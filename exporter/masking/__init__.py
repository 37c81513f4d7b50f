"""Calibration data and statistics, unit scores and persona masks."""
