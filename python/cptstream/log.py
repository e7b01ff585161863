"""One logger for the whole package, configured once by the command line."""

from __future__ import annotations

import logging
import os

__all__ = ["logger", "init_logging", "warn_once"]

logger = logging.getLogger("cptstream")
_warned: set[str] = set()


def init_logging(level: int = logging.INFO) -> None:
    """Send cptstream's records (the Rust core's included) to stderr, on rank 0 only."""
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.ERROR)
    # The Rust core logs under its crate names through pyo3-log.
    for name in ("cptstream", "cptstream_core", "cptstream_py"):
        logging.getLogger(name).setLevel(level if rank == 0 else logging.ERROR)


def warn_once(message: str) -> None:
    """Log a warning the first time this exact message comes up."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
