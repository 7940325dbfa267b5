"""lmforge.training (being filled by the structure step)."""
