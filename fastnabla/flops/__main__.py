"""``python -m fastnabla.flops``: see :mod:`fastnabla.flops.cli`."""

import sys

from fastnabla.flops.cli import main

sys.exit(main())
