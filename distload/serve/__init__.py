"""Serving a loaded pipeline over HTTP: an OpenAI-compatible API on rank 0 (`api`), its
continuous-batching scheduler (`scheduler`, over the pipeline's ``continuous`` schedule),
request checks (`params`), sequences and their text (`sequence`, `text`), metrics
(`metrics`), and the command (`main`)::

    torchrun --nproc_per_node=2 -m distload.serve --model demo --port 8000

Needs the ``[serve]`` extra (FastAPI, uvicorn, tokenizers, jinja2); the loader does not.
Nothing here is imported by ``import distload``.
"""

__all__: list[str] = []
