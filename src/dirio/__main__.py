"""``python -m dirio`` is the ``dirio`` command."""

import sys

from dirio.apps.cli import main

sys.exit(main())
