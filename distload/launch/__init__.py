"""``python -m distload.launch``: torchrun that keeps the ranks' exit codes.

It takes torchrun's own options and target, and starts the ranks through PyTorch's elastic
launcher (`torch.distributed.run.run`, what ``torchrun`` itself runs)::

    python -m distload.launch --nproc_per_node=2 -m distload.load --model demo
    python -m distload.launch --nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT \\
        my_script.py --my-flag

What differs from ``torchrun``: when a rank fails, it exits with that rank's own code (2
for a usage error, 1 for an error, 130/143 when a rank stopped on SIGINT/SIGTERM; a rank
killed by signal N gives 128+N, as a shell does) and prints one line naming the rank and
its error, instead of returning 1 after ``ChildFailedError``'s traceback. Stopped itself by
SIGINT or SIGTERM (Ctrl-C, a scheduler), it stops the ranks and exits with 130 or 143. See
`exit_code` for which rank speaks for the job.
"""

from .errorfile import record_error
from .run import exit_code, main

__all__ = ["main", "exit_code", "record_error"]
