"""lmforge.compress (being filled by the structure step)."""
