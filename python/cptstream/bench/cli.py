"""`cptstream bench shard` and `cptstream bench load`: argument parsing only.

The benchmark modules are imported when a command runs, so `cptstream --help` stays fast and
never imports torch.
"""

from __future__ import annotations

import argparse

__all__ = ["add_bench_parser"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Add `bench` with its `shard` and `load` subcommands to the `cptstream` parser."""
    bench = sub.add_parser("bench", help="throughput and memory benchmarks (tables on stdout, figures as JSON)")
    commands = bench.add_subparsers(dest="bench_command", required=True)

    p = commands.add_parser(
        "shard",
        help="cptstream shard against the tokenization floor and datasets + trl; memory at 1x-16x corpus size",
        description="Compare `cptstream shard` end to end with Python tokenizers batch encoding (the floor) and "
        "with datasets loading + .map tokenization + trl.pack_dataset + save_to_disk, on the same files, "
        "tokenizer and CPUs; then measure peak RSS on copies of the corpus and run under a hard memory limit.",
    )
    p.add_argument("--inputs", nargs="+", help="corpus files or directories (default: the real corpus in the cache)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the real Qwen2 tokenizer in the cache)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--repeats", type=int, default=3, help="runs per pipeline; tables show medians (default 3)")
    p.add_argument("--threads", type=int, default=0, help="CPUs for every pipeline, 0 for all usable (default 0)")
    p.add_argument("--pipelines", type=lambda s: tuple(s.split(",")), default=("cptstream", "floor", "python"),
                   help="comma-separated subset of cptstream,floor,python (default: all three)")
    p.add_argument("--scales", type=_int_list, default=(1, 4, 16),
                   help="corpus copies for the memory test, e.g. 1,4,16; empty string skips it (default 1,4,16)")
    p.add_argument("--memory-limit-mb", type=int, default=384,
                   help="hard memory limit of the limited run at the largest scale, in MiB; 0 skips it (default 384)")
    p.add_argument("--trl-strategy", default="bfd_split", choices=["bfd", "bfd_split", "wrapped"],
                   help="trl.pack_dataset strategy (default bfd_split, which like cptstream drops no token)")
    p.add_argument("--floor-method", default="encode_batch_fast", choices=["encode_batch_fast", "encode_batch"],
                   help="tokenizers method of the floor (default encode_batch_fast, ids only like the Rust pipeline)")
    p.add_argument("--work-dir", help="keep outputs and job logs here (default: a temporary directory, removed)")
    p.add_argument("--json", default="runs/bench-shard.json", help="where to write the figures (default runs/bench-shard.json)")
    p.set_defaults(func=_cmd_shard)

    p = commands.add_parser(
        "load",
        help="tokens/s of the streaming dataset against datasets + DataCollatorWithFlattening",
        description="Measure the tokens/s that PackedLoader delivers to a training loop with 0, 1 and 2 DataLoader "
        "workers, against Dataset.from_file on the same shards with a DataLoader and DataCollatorWithFlattening.",
    )
    p.add_argument("--shards", help="a finished cptstream shard output (default: shard --inputs first)")
    p.add_argument("--inputs", nargs="+", help="corpus to shard when --shards is not given (default: the real corpus)")
    p.add_argument("--tokenizer", help="tokenizer to shard with (default: the real Qwen2 tokenizer)")
    p.add_argument("--seq-len", type=int, default=4096, help="row length when sharding here (default 4096)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--workers", type=_int_list, default=(0, 1, 2), help="DataLoader worker counts (default 0,1,2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; tables show medians (default 3)")
    p.add_argument("--max-rows", type=int, default=0, help="rows per run, 0 for one whole epoch (default 0)")
    p.add_argument("--work-dir", help="keep shards made here and job logs (default: a temporary directory, removed)")
    p.add_argument("--json", default="runs/bench-load.json", help="where to write the figures (default runs/bench-load.json)")
    p.set_defaults(func=_cmd_load)


def _cmd_shard(args: argparse.Namespace) -> int:
    from cptstream.bench import shard_bench
    from cptstream.bench.corpus import default_inputs, default_tokenizer
    from cptstream.bench.report import write_json

    cfg = shard_bench.ShardBenchConfig(
        inputs=args.inputs or [str(p) for p in default_inputs()],
        tokenizer=args.tokenizer or str(default_tokenizer()),
        seq_len=args.seq_len,
        repeats=args.repeats,
        threads=args.threads,
        pipelines=args.pipelines,
        scales=args.scales,
        memory_limit_mb=args.memory_limit_mb,
        trl_strategy=args.trl_strategy,
        floor_method=args.floor_method,
        work_dir=args.work_dir,
    )
    figures = shard_bench.run(cfg)
    write_json(args.json, figures)
    print(shard_bench.format_report(figures))
    print(f"\nfigures written to {args.json}")
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    from cptstream.bench import load_bench
    from cptstream.bench.corpus import default_inputs, default_tokenizer
    from cptstream.bench.report import write_json

    inputs, tokenizer = args.inputs, args.tokenizer
    if args.shards is None:
        inputs = inputs or [str(p) for p in default_inputs()]
        tokenizer = tokenizer or str(default_tokenizer())
    cfg = load_bench.LoadBenchConfig(
        shards=args.shards,
        inputs=inputs,
        tokenizer=tokenizer,
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        workers=args.workers,
        repeats=args.repeats,
        max_rows=args.max_rows,
        work_dir=args.work_dir,
    )
    figures = load_bench.run(cfg)
    write_json(args.json, figures)
    print(load_bench.format_report(figures))
    print(f"\nfigures written to {args.json}")
    return 0
