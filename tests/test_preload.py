"""The command line's background imports (:mod:`dirio.apps.preload`), in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys
from dirio.apps.preload import preload_slow_imports
assert "torch._dynamo" not in sys.modules and "matplotlib" not in sys.modules
preload_slow_imports(figure=sys.argv[1] == "figure").join()
print("torch._dynamo" in sys.modules, "dirio.viz.figures" in sys.modules)
"""


def _imported(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_figure_module_is_imported_in_the_background_and_the_compiler_is_not():
    assert _imported("figure") == "False True"


def test_without_a_figure_nothing_is_imported():
    assert _imported("none") == "False False"
