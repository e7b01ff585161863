"""Command line: `cptstream shard | inspect | verify | train | export | bench`."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from cptstream.log import init_logging, logger

__all__ = ["main", "build_parser"]

# Exit status when the run finished but some input files could not be read at all.
EXIT_BAD_FILES = 3

# Write failures that end once space or quota is back; the last checkpoint stays valid.
_OUT_OF_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _add_shard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="clean, tokenize and pack raw corpora into Arrow shards",
        description="Read JSONL (.jsonl, .jsonl.zst, .jsonl.gz), Parquet and text files (.txt, .md; one "
        "document per file), clean them, append the EOS token to every document, tokenize, pack into "
        "rows of --seq-len tokens and write zstd-compressed Arrow shards plus manifest.json.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs, any mix of formats")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (and tokenizer_config.json), or the file")
    p.add_argument("--output", "-o", help="output directory for shards and manifest.json")
    p.add_argument("--config", help="YAML or JSON file of shard settings; flags override it")
    p.add_argument("--seq-len", type=int, help="tokens per row (default 4096)")
    p.add_argument("--packing", choices=["bfd", "concat"], help="bfd keeps documents whole (default); concat streams")
    p.add_argument("--text-field", help="JSON key or Parquet column holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, help="share of documents for the validation split (default 0)")
    p.add_argument("--val-seed", type=int, help="salt of the validation split hash (default 0)")
    p.add_argument("--num-threads", type=int, help="worker threads, 0 for all cores; never changes the output")
    p.add_argument("--eos-token", help="document separator; default: eos_token of tokenizer_config.json")
    p.add_argument("--bos", choices=["auto", "always", "never"], help="BOS per document (default auto: as the tokenizer)")
    p.add_argument("--on-error", choices=["skip", "fail"], help="bad records and files: count and skip (default) or stop")
    p.add_argument("--invalid-utf8", choices=["replace", "skip"], help="invalid UTF-8: replace with U+FFFD (default) or skip the record")
    p.add_argument("--normalization", dest="clean.normalization", choices=["nfc", "nfkc", "none"], help="Unicode normalization (default nfc)")
    p.add_argument("--min-chars", dest="clean.min_chars", type=int, help="drop documents shorter than this after cleaning (default 1)")
    p.add_argument("--max-symbol-ratio", dest="clean.max_symbol_ratio", type=float, help="drop documents with more punctuation and symbols than this share (default 0.7)")
    p.add_argument("--max-repeated-line-ratio", dest="clean.max_repeated_line_ratio", type=float, help="drop documents with more repeated lines than this share (default 0.7)")
    p.add_argument("--no-clean", dest="clean.enabled", action="store_const", const=False, help="skip the cleaning steps (filters still apply)")
    p.add_argument("--no-dedup", dest="dedup", action="store_const", const=False, help="keep exact duplicate documents")
    p.add_argument("--dedup-memory-mb", type=int, help="memory for exact deduplication before it turns into a Bloom filter (default 512)")
    p.add_argument("--shard-rows", type=int, help="rows per shard (default: 128 MiB of token ids)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output from its last checkpoint")
    p.add_argument("--tolerate-bad-files", action="store_true", help="exit 0 even when some input files could not be read")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_shard)


def _cmd_shard(args: argparse.Namespace) -> int:
    from cptstream.shard import format_summary, load_config, run

    skip = {"inputs", "config", "resume", "tolerate_bad_files", "no_progress", "func", "command", "verbose"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    overrides["inputs"] = args.inputs
    cfg = load_config(args.config, overrides)
    if not cfg["tokenizer"]:
        raise ValueError("--tokenizer is required (or `tokenizer:` in --config)")
    if not cfg["output"]:
        raise ValueError("--output is required (or `output:` in --config)")

    manifest, already_complete = run(cfg, resume=args.resume, show_progress=not args.no_progress)
    if already_complete:
        logger.info("%s is already complete; nothing to do", cfg["output"])
    print(format_summary(manifest))
    failed = sum(manifest["counts"]["files_failed"].values())
    if failed and not args.tolerate_bad_files:
        logger.error("%d input files could not be read (listed above); pass --tolerate-bad-files to accept that", failed)
        return EXIT_BAD_FILES
    return 0


def _add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summary, row-length histogram and decoded sample rows of a shard directory")
    p.add_argument("directory")
    p.add_argument("--samples", type=int, default=3, help="decoded rows to show (default 3)")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    p.add_argument("--tokenizer", help="tokenizer to decode with (default: the one recorded in the manifest)")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from cptstream.shards import inspect_dir

    print(inspect_dir(args.directory, samples=args.samples, tokenizer=args.tokenizer, split=args.split))
    return 0


def _add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every shard against the manifest (rows, tokens, sha256)")
    p.add_argument("directory")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from cptstream.shards import verify_dir

    report = verify_dir(args.directory)
    for problem in report["problems"]:
        print(f"FAIL {problem}")
    status = "OK" if not report["problems"] else f"{len(report['problems'])} problems"
    print(f"{status}: {report['shards']} shards, {report['rows']:,} rows, {report['tokens']:,} tokens, "
          f"max token id {report['max_token_id']}")
    return 0 if not report["problems"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cptstream", description=__doc__)
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_shard_parser(sub)
    _add_inspect_parser(sub)
    _add_verify_parser(sub)
    try:
        from cptstream.train.cli import add_export_parser, add_train_parser
    except ImportError as e:  # the training stack is optional for sharding-only installs
        logging.getLogger("cptstream").debug("train commands unavailable: %s", e)
    else:
        add_train_parser(sub)
        add_export_parser(sub)
    try:
        from cptstream.bench.cli import add_bench_parser
    except ImportError as e:
        logging.getLogger("cptstream").debug("bench command unavailable: %s", e)
    else:
        add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_logging(logging.DEBUG if args.verbose else logging.INFO)
    from cptstream.errors import CptstreamError
    from cptstream.lock import LockHeldError

    try:
        return args.func(args)
    except (ValueError, CptstreamError, LockHeldError) as e:
        logger.error("%s", e)
        return 2
    except OSError as e:
        # The message names the path; a full disk or a file-size limit gets the way to continue.
        hint = ""
        if e.errno in _OUT_OF_SPACE and args.command == "shard":
            hint = "; free space (or raise the limit), then rerun the same command with --resume"
        # Core errors carry "PATH: reason" as strerror; Python's own carry the path in filename.
        message = e.strerror if e.errno and e.strerror and e.filename is None else str(e)
        logger.error("%s%s", message, hint)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; rerun the same command with --resume to continue")
        return 130


if __name__ == "__main__":
    sys.exit(main())
