"""Subcommands `cptstream train` and `cptstream export`, added to the main parser by cptstream.cli.

Each `add_*_parser(subparsers)` adds its subcommand and sets `func`, which takes the parsed
arguments and returns the exit code. Expected failures (bad config, mismatched shards, a held
lock, missing files) are logged as one error line with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cptstream.lock import LockHeldError
from cptstream.train.checks import CheckError
from cptstream.train.config import ConfigError, load_config, parse_override

__all__ = ["add_export_parser", "add_train_parser", "main"]

logger = logging.getLogger("cptstream")

# torch is imported only when a command runs, so that `cptstream shard --help` stays fast.
EXPECTED_ERRORS = (ConfigError, CheckError, LockHeldError, FileNotFoundError, ValueError)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `train` subcommand to `subparsers` and return its parser."""
    parser = subparsers.add_parser(
        "train",
        help="continued pretraining of a LoRA adapter on packed shards",
        description="Train a LoRA adapter (plus full embed_tokens and lm_head) on shards from `cptstream shard`. "
        "The YAML config is the run; the flags below override single fields of it.",
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML run config, e.g. configs/tiny-cpu.yaml")
    parser.add_argument("--data", help="shard directory with manifest.json (sets data.path)")
    parser.add_argument("--output", help="run directory for checkpoints, adapter and metrics (sets train.output)")
    parser.add_argument("--model", help="local base model directory (sets model.path)")
    parser.add_argument("--backend", choices=["auto", "unsloth", "hf"], help="sets model.backend")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (sets train.max_steps; default: from epochs)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument(
        "--stop-after", type=int, metavar="STEP", help="checkpoint and exit 0 after this step, as a preempted job would"
    )
    parser.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard events")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, value in YAML syntax (repeatable), e.g. --set lora.r=16",
    )
    parser.set_defaults(func=run_train)
    return parser


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `export` subcommand to `subparsers` and return its parser."""
    parser = subparsers.add_parser(
        "export",
        help="merge a trained adapter into its base model",
        description="Write the base model with the LoRA adapter merged in, as safetensors, with the tokenizer.",
    )
    parser.add_argument("adapter", type=Path, help="adapter directory (OUTPUT/adapter or a checkpoint's adapter/)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base weights (required)")
    parser.add_argument("--output", type=Path, required=True, help="directory for the merged model")
    parser.add_argument("--base", type=Path, help="local base model (default: the path in adapter_config.json)")
    parser.set_defaults(func=run_export)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run `cptstream train` with parsed arguments and return the exit code."""
    from cptstream.data import DataExhaustedError
    from cptstream.train import run

    _ensure_logging()
    try:
        overrides = dict(parse_override(text) for text in args.set)
        overrides.update(
            {
                "data.path": args.data,
                "train.output": args.output,
                "model.path": args.model,
                "model.backend": args.backend,
                "train.max_steps": args.max_steps,
                "log.tensorboard": args.tensorboard,
            }
        )
        config = load_config(args.config, overrides)
        return run(config, resume=args.resume, stop_after=args.stop_after)
    except (*EXPECTED_ERRORS, DataExhaustedError) as err:
        logger.error("%s", err)
        return 2


def run_export(args: argparse.Namespace) -> int:
    """Run `cptstream export` with parsed arguments and return the exit code."""
    from cptstream.train.export import export_merged

    _ensure_logging()
    if not args.merge:
        logger.error("export needs --merge: the adapter directory itself is the unmerged export")
        return 2
    try:
        export_merged(args.adapter, args.output, base=args.base)
    except (FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2
    return 0


def _ensure_logging() -> None:
    # The main CLI normally configures logging; this covers `python -m cptstream.train.cli`.
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run `train` or `export` without the main cptstream CLI."""
    parser = argparse.ArgumentParser(prog="python -m cptstream.train.cli")
    subparsers = parser.add_subparsers(required=True)
    add_train_parser(subparsers)
    add_export_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
