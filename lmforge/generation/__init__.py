"""lmforge.generation (being filled by the structure step)."""
