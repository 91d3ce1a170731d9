"""Calibration: capture block inputs, accumulate Gram matrices, quantize block by block."""

from mixq.calibration.gram import Gram
from mixq.calibration.sequential import quantize_sequential_

__all__ = ["Gram", "quantize_sequential_"]
