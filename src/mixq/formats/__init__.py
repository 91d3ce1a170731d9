"""Number formats. Importing this package registers every family."""

from mixq.formats import fixedpoint, integer, kquant, log, minifloat, nf  # noqa: F401  (registration)
from mixq.formats.base import Format, QTensor
from mixq.formats.fixedpoint import FixedPointFormat
from mixq.formats.integer import IntFormat
from mixq.formats.log import LogFormat
from mixq.formats.minifloat import MinifloatFormat
from mixq.formats.nf import NFFormat
from mixq.formats.registry import families, parse_format

__all__ = ["FixedPointFormat", "Format", "IntFormat", "LogFormat", "MinifloatFormat", "NFFormat", "QTensor", "families", "parse_format"]
