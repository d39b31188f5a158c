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


def test_the_optimisers_compiler_module_and_the_figure_module_are_imported_in_the_background():
    assert _imported("figure") == "True True"


def test_without_a_figure_matplotlib_is_not_imported():
    assert _imported("none") == "True False"
