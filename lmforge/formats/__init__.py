"""lmforge.formats (being filled by the structure step)."""
