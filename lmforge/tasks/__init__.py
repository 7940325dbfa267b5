"""lmforge.tasks (being filled by the structure step)."""
