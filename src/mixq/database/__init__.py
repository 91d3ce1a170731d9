"""The layer database: every searched layer solved at every choice of a search space, once, on the
base model's calibration inputs, kept on disk and swapped into the model by search trials.

``key`` (what the entries depend on), ``store`` (shards and manifest), ``build`` (the Gram pass
and the solves).
"""

from mixq.database.build import BuildReport, build_database, estimate_bytes
from mixq.database.key import CalibrationSet, DatabaseError, DatabaseKey, entry_id
from mixq.database.store import Entry, LayerDatabase

__all__ = ["BuildReport", "CalibrationSet", "DatabaseError", "DatabaseKey", "Entry", "LayerDatabase", "build_database",
           "entry_id", "estimate_bytes"]
