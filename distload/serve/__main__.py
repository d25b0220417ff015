"""``python -m distload.serve`` (see `distload.serve.main`)."""

from .main import entry

if __name__ == "__main__":
    entry()
