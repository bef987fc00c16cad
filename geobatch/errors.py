"""One error root for everything geobatch raises on purpose.

Each class also inherits the builtin it refines, so callers that catch ``OSError`` or ``ValueError``
keep working. Messages name the file or field at fault and, where there is one, the fix.
"""


class GeobatchError(Exception):
    """Root of all errors raised by geobatch."""


class JobSpecError(GeobatchError, ValueError):
    """The job file is missing, unparsable or fails validation."""


class SceneUnreadable(GeobatchError, OSError):
    """A scene cannot be opened or a window of it cannot be read."""


class MissingBand(GeobatchError, ValueError):
    """A scene lacks a band the model needs (e.g. no NIR for water)."""


class UnknownModel(GeobatchError, KeyError):
    """No backend is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnsupportedPrompt(GeobatchError, ValueError):
    """The model cannot answer this prompt."""
