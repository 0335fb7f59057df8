"""Explicit Q/DQ quantization of a bundle (INT8/FP8 activations, INT4 weight-only) with calibration data from its own stages."""
