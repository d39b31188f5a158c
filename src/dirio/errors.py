"""The one exception type that carries a user-facing, one-line message."""


class DirioError(Exception):
    """A problem with the user's input or request, reported as one line.

    The CLI prints ``dirio: error: <message>`` and exits with status 2; it never shows a
    traceback for this type. The message names the file (when there is one) and the problem.
    An option is named by its key in backticks (``pass `overwrite` to replace it``): the key is
    the keyword argument of the Python function and the configuration-file key; the command line
    writes its flag instead (``--overwrite``).
    """
