"""mixq: post-training, weight-only, mixed-precision quantization of transformer LLMs."""

from mixq.errors import MixqError
from mixq.formats import Format, QTensor, parse_format
from mixq.plan import LayerSpec, Plan
from mixq.quantize import quantize_

__version__ = "0.1.0"
__all__ = ["Format", "LayerSpec", "MixqError", "Plan", "QTensor", "parse_format", "quantize_", "__version__"]
