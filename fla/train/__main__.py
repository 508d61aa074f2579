"""``python -m fla.train <flame flags>``: the same as ``python -m fla.train.train``."""

import sys

from fla.train.train import main

sys.exit(main())
