"""mixq: post-training, weight-only, mixed-precision quantization of transformer LLMs."""

from mixq.errors import MixqError
from mixq.formats import Format, QTensor, parse_format
from mixq.plan import LayerSpec, Plan
from mixq.quantize import quantize_

__version__ = "0.1.0"


def load(path: str, *, dtype: str | None = None, device: str = "cpu"):  # type: ignore[no-untyped-def]
    """Load a model and its tokenizer (``mixq.models.LoadedModel``): an exported folder (mixq's
    checkpoint, compressed-tensors) in its export dtype unless ``dtype`` is given, or anything
    ``mixq.models.load_model`` takes (a Hugging Face folder, a .gguf file, a named model)."""
    from mixq.export import exported_format, load_export
    from mixq.models import load_model

    if exported_format(path):
        return load_export(path, dtype=dtype, device=device)
    return load_model(path, dtype=dtype or "float32", device=device)


__all__ = ["Format", "LayerSpec", "MixqError", "Plan", "QTensor", "load", "parse_format", "quantize_", "__version__"]
