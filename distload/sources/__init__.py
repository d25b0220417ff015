"""Where checkpoints come from: one `Source` per kind of storage (see `base.py` for the
order of calls), registered in the order they are tried — `demo`, a local path, a hub id,
an ``s3://`` URL (`s3/`, the optional extra ``distload[s3]``).
Knows nothing of plans or ranks; only the demo source builds a model (for its shapes).

Example::

    source = open_source("Qwen/Qwen2-0.5B")      # or "./llama", or "demo"
    index = source.index()                       # rank 0: headers and config
    root = source.root()                         # every rank: the directory on its node
"""

from .base import Source, open_source, register_source, registered_sources
from .demo import DEMO_CONFIG, DemoSource, ensure_demo_checkpoint, make_checkpoint  # noqa: F401 - registers
from .local import LocalSource, local_path  # noqa: F401 - registers
from .hub import HubSource, parse_hub_id, resolve_model  # noqa: F401 - registers
from .s3 import S3Source  # noqa: F401 - registers (boto3 imported only when used)

__all__ = [
    "Source", "open_source", "register_source", "registered_sources", "DemoSource", "LocalSource", "local_path",
    "HubSource", "parse_hub_id", "resolve_model", "DEMO_CONFIG", "ensure_demo_checkpoint",
    "make_checkpoint", "S3Source",
]
