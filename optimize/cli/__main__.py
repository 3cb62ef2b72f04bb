"""``python -m diffaccel.optimize.cli``: the same as the ``diffaccel`` command."""
import sys

from diffaccel.optimize.cli import main

sys.exit(main())
