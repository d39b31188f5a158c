"""Running ``dirio`` in-process in tests, with its exit status and output captured."""

import contextlib
import io
from types import SimpleNamespace

from dirio.apps.cli import main


def run_cli(argv) -> SimpleNamespace:
    """``main(argv)`` with stdout and stderr captured: ``rc``, ``out``, ``err`` (argparse's usage
    errors exit through SystemExit, whose code becomes ``rc``)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exit_:
            rc = exit_.code
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())
