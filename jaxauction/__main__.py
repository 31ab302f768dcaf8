"""``python -m jaxauction``: the ``jaxauction`` command (see :mod:`jaxauction.console`)."""

import sys

from jaxauction.console import main

sys.exit(main())
