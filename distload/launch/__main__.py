"""``python -m distload.launch [torchrun options] TARGET ...`` (see `distload.launch`)."""

import sys

from .run import main

sys.exit(main())
