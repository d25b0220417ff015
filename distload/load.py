"""The CLI: parse → init → plan → load → run → report.

    torchrun --nproc_per_node=2 -m distload.load --model PATH|ORG/NAME|demo [--report out.json]
"""

from __future__ import annotations

import sys
import time

import torch

from .api import load
from .config import RunConfig, parse_args
from .dist import shutdown
from .errors import DistloadError, RankError
from .log import logger, setup_logging
from .report import format_table, write_report

__all__ = ["main"]

DEMO_INPUT_IDS = ("1,15,27,300,42,7", "5,9,81,2")


def _prompts(cfg: RunConfig) -> list[list[int]]:
    texts = cfg.input_ids or (DEMO_INPUT_IDS if cfg.model == "demo" else ())
    try:
        return [[int(t) for t in text.split(",") if t.strip()] for text in texts]
    except ValueError as e:
        raise ValueError(f"--input-ids takes comma-separated integers: {e}") from None


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def run(cfg: RunConfig) -> int:
    pipe = load(cfg.model, dtype=cfg.dtype, strict=cfg.strict, cache_dir=cfg.cache_dir,
                device=cfg.device, timeout_s=cfg.timeout, read_workers=cfg.read_workers,
                micro_batches=cfg.micro_batches)
    if pipe.rank == 0:
        logger.info("loaded %s\n%s", pipe.plan.checkpoint, format_table(pipe.job_report))
        if cfg.report:
            write_report(pipe.job_report, cfg.report)
            logger.info("report written to %s", cfg.report)
    prompts = _prompts(cfg)
    if cfg.max_new_tokens and prompts:
        ids, mask = _left_pad(prompts)
        start = time.perf_counter()
        out = pipe.generate(ids, mask, max_new_tokens=cfg.max_new_tokens)
        seconds = time.perf_counter() - start
        if pipe.rank == 0:
            for row, prompt in zip(out.tolist(), prompts):
                logger.info("%s -> %s", prompt, row[ids.shape[1]:])
            new_tokens = len(prompts) * cfg.max_new_tokens
            logger.info("generated %d tokens in %.3f s (%.1f tokens/s)", new_tokens, seconds, new_tokens / seconds)
    shutdown(pipe.world)
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    setup_logging(cfg.log_level.upper())
    try:
        return run(cfg)
    except RankError as e:  # another rank failed; it printed its own error
        logger.error("%s", e)
    except (DistloadError, ValueError, OSError) as e:
        logger.error("%s: %s", type(e).__name__, e)
    except Exception:  # noqa: BLE001 - an unexpected failure still stops this rank cleanly
        logger.exception("unexpected failure")
    shutdown(failed=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
