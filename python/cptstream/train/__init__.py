"""Training side of cptstream: LoRA continued pretraining on packed shards, and adapter export.

The package imports nothing heavy at import time, so that `cptstream.data` workers and the CLI
parser stay cheap. `run` loads the training loop on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def run(config: Any, **kwargs: Any) -> int:
    """Train with a resolved `RunConfig`; see `cptstream.train.loop.run`."""
    from cptstream.train.loop import run as run_loop

    return run_loop(config, **kwargs)
