"""`python -m dinado.cli`, as the `dinado` console script."""

import sys

from . import main

sys.exit(main())
