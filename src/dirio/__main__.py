"""``python -m dirio`` is the ``dirio`` command."""

import sys

from .cli import main

sys.exit(main())
