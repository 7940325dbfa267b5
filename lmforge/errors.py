"""One exception hierarchy for lmforge.

Every error a user can cause (bad input, a missing file, a config field that does not exist) is raised as an
`LmforgeError` subclass whose message is one line naming the bad value. The CLI prints it as `error: <message>`
and exits non-zero; the server turns it into OpenAI-shaped error JSON. Anything else is a bug in lmforge.
"""


class LmforgeError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(LmforgeError, ValueError):
    """A config field, CLI flag or argument has a bad or unknown value."""


class DataError(LmforgeError, ValueError):
    """Input data is missing, empty, unreadable or malformed."""


class TokenizerError(LmforgeError, ValueError):
    """A tokenizer cannot be trained, loaded or used as asked."""


class CheckpointError(LmforgeError):
    """A model directory or weights file is missing, corrupt, or does not match its config."""


class GenerationError(LmforgeError, ValueError):
    """Bad generation controls or a prompt that cannot be generated from."""


class NetworkError(LmforgeError):
    """A download was needed but the network (or the Hub) could not be reached."""
