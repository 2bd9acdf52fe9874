"""vfm: vertical foundation models (placeholder during bootstrap)."""
__version__ = "0.1.0"
