"""Moved: constrained decoding lives in `lmforge.generation.constrain` (the Python API and the CLI use it too).

This name stays so code written against `lmforge.serve.constrain` keeps working.
"""

from lmforge.generation.constrain import (  # noqa: F401
    ByteConstraint, JsonMachine, SequenceMachine, json_constraint, schema_machine, tool_call_constraint,
    vocabulary_bytes,
)
