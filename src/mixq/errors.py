"""User-facing errors. Each one is printed as one line by the CLI (exit code 2)."""


class MixqError(Exception):
    """Base class of every error caused by user input (bad model, plan, data, format)."""


class FormatError(MixqError):
    """A format name or parameter that mixq cannot represent."""


class PlanError(MixqError):
    """A plan that is malformed or does not fit the model."""


class ModelError(MixqError):
    """A model that cannot be found or loaded."""


class DataError(MixqError):
    """A dataset that cannot be found or is too short."""


class ExportError(MixqError):
    """A model or plan that an export target cannot represent, or an output that cannot be written."""
