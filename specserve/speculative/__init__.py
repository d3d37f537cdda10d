"""Speculative decoding: drafters, verification, verify-length planning and calibration."""
