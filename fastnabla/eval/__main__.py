"""``python -m fastnabla.eval``: see :mod:`fastnabla.eval.cli`."""

import sys

from fastnabla.eval.cli import main

sys.exit(main())
