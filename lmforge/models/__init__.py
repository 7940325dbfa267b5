"""lmforge.models (being filled by the structure step)."""
