"""``python -m distload.launch [torchrun options] TARGET ...`` (see `distload.launch`)."""

from .run import entry

entry()
