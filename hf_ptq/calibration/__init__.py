"""Calibration data: describing it for config.json (and, with the calibrated methods, turning it into token batches)."""
