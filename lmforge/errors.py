"""The one exception type that means "the user asked for something we cannot do".

The CLI prints it as a single line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, a missing file, an unknown name: a message meant for the user."""


class Note(UserWarning):
    """Something done on the user's behalf that they should know about (a file read as GB18030, ...).

    Raised with `warnings.warn(..., Note)`; the CLI prints it as one "note:" line.
    """
