"""folklm's version, importable from every layer (lineage records it)."""

__version__ = "0.1.0"
