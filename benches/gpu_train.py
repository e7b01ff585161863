"""GPU check of `cptstream train`: both backends on one Qwen2.5-0.5B-sized model and the same shards.

`run` builds a randomly initialized Qwen2 model with Qwen2.5-0.5B's shape (hidden 896, 24 layers,
14 query and 2 key/value heads, MLP 4864, tied embeddings), sized to the shards' tokenizer. It
saves the model in bf16 with the tokenizer files beside it, and then trains a LoRA with full `embed_tokens` and
`lm_head` for a fixed number of steps with each backend in turn. Every backend runs in its own
`cptstream train` process because importing unsloth patches transformers' Qwen2 classes for the
whole process, so an hf run after it in the same process would time Unsloth's kernels. The
summary is a table and a JSON file: tokens/s over the steps after warm-up, peak GPU memory,
final train loss, validation loss before and after, and the dtypes of the trainable weights.

`corpus` writes a fallback corpus from the docstrings of the Python standard library, real
English technical prose that every machine has, for a GPU machine that has no copy of the real one.

    python benches/gpu_train.py run --data SHARDS --tokenizer DIR --work DIR [--json FILE]
    python benches/gpu_train.py run --tiny --device cpu ...     # CPU smoke run, seconds
    python benches/gpu_train.py corpus --output DIR --mb 8

Exit status of `run`: 0 when every backend that ran finished, else the sum of 1 (unsloth failed),
2 (hf failed) and 4 (the model could not be built). A backend that cannot run here (unsloth
without CUDA) is reported as skipped and does not fail the run.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

BACKENDS = ("unsloth", "hf")
FAILURE_BITS = {"unsloth": 1, "hf": 2}
MODEL_BUILD_FAILED = 4

# Qwen2.5-0.5B's config.json (Qwen/Qwen2.5-0.5B on the Hugging Face hub), without its weights.
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# Seconds of a CPU smoke run, not a benchmark: 4 query and 2 key/value heads of width 16.
TINY = {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}

# The child processes must not reach for the network: the GPU machine has none, and a hub lookup
# would wait for its timeout. UNSLOTH_DISABLE_STATISTICS stops Unsloth's usage ping.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def say(message: str) -> None:
    """Print one progress line, because this output is the GPU check's log."""
    print(f"[gpu_train] {message}", flush=True)


# ---- fallback corpus ----


def write_stdlib_corpus(output: Path, megabytes: float) -> Path:
    """Write up to `megabytes` of standard-library docstrings as JSONL, one document per module.

    Returns:
        The JSONL file written.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    output.mkdir(parents=True, exist_ok=True)
    path = output / "stdlib-docstrings.jsonl"
    budget = int(megabytes * 1_000_000)
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for source in sorted(stdlib.rglob("*.py")):
            if "site-packages" in source.parts or "test" in source.parts:
                continue
            text = _module_docstrings(source)
            if len(text) < 200:
                continue
            line = json.dumps({"text": text, "source": str(source.relative_to(stdlib))}, ensure_ascii=False)
            out.write(line + "\n")
            written += len(line)
            if written >= budget:
                break
    if written == 0:
        raise FileNotFoundError(f"no documented modules found under {stdlib}; pass a corpus instead")
    say(f"wrote {written / 1e6:.1f} MB of standard-library docstrings to {path}")
    return path


def _module_docstrings(source: Path) -> str:
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                name = getattr(node, "name", source.stem)
                parts.append(f"{name}\n\n{doc}")
    return "\n\n".join(dict.fromkeys(parts))


# ---- model ----


def build_model(tokenizer_dir: Path, output: Path, shape: dict[str, Any], *, bf16: bool, seed: int = 0) -> dict:
    """Save a random Qwen2 model of `shape` sized to the tokenizer, with the tokenizer files beside it.

    The embedding rows are the token count rounded up to a multiple of 64, as `cptstream.tiny_model`
    does. The model is built on the CPU, so the parent process allocates no GPU memory while
    the backends are measured.

    Returns:
        The model's description for the JSON report.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    rows = -(-tokens // 64) * 64
    eos_id = _eos_id(tokenizer_dir, tokenizer)
    config = Qwen2Config(vocab_size=rows, bos_token_id=eos_id, eos_token_id=eos_id, **shape)

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if bf16:
        model = model.to(torch.bfloat16)
    shutil.rmtree(output, ignore_errors=True)
    model.save_pretrained(str(output))
    from cptstream.tokenizer_files import copy_tokenizer_files

    copy_tokenizer_files(output, tokenizer_dir)
    parameters = sum(p.numel() for p in model.parameters())
    say(
        f"built a {config.num_hidden_layers}-layer, width-{config.hidden_size} Qwen2 model: {parameters / 1e6:.1f}M "
        f"weights, {rows} embedding rows, {'bf16' if bf16 else 'fp32'}, in {time.perf_counter() - started:.1f}s"
    )
    return {
        "path": str(output),
        "parameters": parameters,
        "vocab_rows": rows,
        "tokenizer_tokens": tokens,
        "dtype": "bfloat16" if bf16 else "float32",
        **shape,
    }


def _eos_id(tokenizer_dir: Path, tokenizer) -> int | None:
    config_file = tokenizer_dir / "tokenizer_config.json"
    eos = None
    if config_file.is_file():
        eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return tokenizer.token_to_id(eos or "<|endoftext|>")


# ---- one backend ----


def run_config(model_dir: Path, data: Path, output: Path, args: argparse.Namespace, seq_len: int) -> dict:
    """Return the `cptstream train` config of one backend run: the 7B recipe's LoRA at a shorter schedule."""
    return {
        "model": {
            "path": str(model_dir),
            "max_seq_length": seq_len,
            "precision": "auto",
            "attn_implementation": "auto",
            "gradient_checkpointing": not args.tiny,
        },
        "lora": {"r": 32, "alpha": 32, "dropout": 0.0, "use_rslora": True},
        "optim": {"lr": 2.0e-4, "embedding_lr": 2.0e-5, "warmup_ratio": 0.1, "schedule": "cosine"},
        "data": {
            "path": str(data),
            "micro_batch_size": args.micro_batch_size,
            "grad_accum": args.grad_accum,
            "num_workers": 0 if args.tiny else 2,
            "shuffle_block": 256,
            "eval_max_batches": args.eval_batches,
        },
        "train": {"output": str(output), "epochs": 1, "max_steps": args.steps, "seed": 3407},
        "checkpoint": {"every": args.steps, "keep": 1},
        "log": {"every": 1, "eval_every": args.steps},
    }


def run_backend(backend: str, config_path: Path, work: Path, args: argparse.Namespace) -> dict:
    """Run `cptstream train --backend BACKEND` in a child process and summarize its metrics.jsonl."""
    import yaml

    output = Path(yaml.safe_load(config_path.read_text(encoding="utf-8"))["train"]["output"])
    shutil.rmtree(output, ignore_errors=True)
    trainable_report = work / f"trainable-{backend}.json"
    trainable_report.unlink(missing_ok=True)
    env = {**os.environ, **OFFLINE_ENV}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, str(Path(__file__).resolve()), "_train-one", str(config_path), backend]
    command.append(str(trainable_report))
    say(f"{backend}: cptstream train --config {config_path} --backend {backend} (limit {args.timeout_s}s)")

    # The child runs in the work directory because Unsloth writes its compiled-kernel cache and
    # offloaded embeddings into the current directory.
    started = time.perf_counter()
    try:
        exit_code = subprocess.run(command, cwd=work, env=env, timeout=args.timeout_s, check=False).returncode
        reason = None if exit_code == 0 else f"cptstream train exited with {exit_code}; see the log above"
    except subprocess.TimeoutExpired:
        exit_code, reason = None, f"timed out after {args.timeout_s}s"
    wall = time.perf_counter() - started

    result = {"status": "ok" if exit_code == 0 else "failed", "exit_code": exit_code, "reason": reason}
    result["wall_s"] = round(wall, 1)
    result.update(summarize_metrics(output / "metrics.jsonl", args.warmup_steps))
    if trainable_report.is_file():
        result["trainable"] = json.loads(trainable_report.read_text(encoding="utf-8"))
    if result["status"] == "ok" and result["steps"] != args.steps:
        result.update(status="failed", reason=f"metrics.jsonl has {result['steps']} steps, expected {args.steps}")
    if result["status"] == "ok" and not math.isfinite(result["final_loss"]):
        result.update(status="failed", reason=f"final loss is {result['final_loss']}")
    say(f"{backend}: {result['status']} in {wall:.1f}s" + (f" ({result['reason']})" if result["reason"] else ""))
    return result


def summarize_metrics(path: Path, warmup_steps: int) -> dict:
    """Summarize metrics.jsonl: tokens/s after `warmup_steps` (compilation, allocator growth), losses, memory."""
    summary: dict[str, Any] = {"steps": 0, "final_loss": math.nan, "tokens_per_s": None, "peak_mem_gib": None}
    summary.update({"mfu": None, "eval_loss_first": None, "eval_loss_last": None})
    if not path.is_file():
        return summary
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    if evals:
        summary["eval_loss_first"] = evals[0]["eval/loss"]
        summary["eval_loss_last"] = evals[-1]["eval/loss"]
    if not steps:
        return summary
    summary["steps"] = steps[-1]["step"]
    summary["final_loss"] = steps[-1]["train/loss"]

    # With too few steps to drop any, all of them count, so a smoke run still reports a rate.
    steady = steps[warmup_steps:] if len(steps) > warmup_steps else steps
    seconds = sum(r["train/step_ms"] for r in steady) / 1000
    tokens = sum(r["train/tok_per_sec"] * r["train/step_ms"] / 1000 for r in steady)
    summary["tokens_per_s"] = round(tokens / seconds, 1) if seconds > 0 else None
    memory = [r["gpu/mem_gib"] for r in steps if "gpu/mem_gib" in r]
    summary["peak_mem_gib"] = round(max(memory), 2) if memory else None
    mfu = [r["train/mfu"] for r in steady if "train/mfu" in r]
    summary["mfu"] = round(sum(mfu) / len(mfu), 4) if mfu else None
    return summary


def train_one(config_path: str, backend: str, report_path: str) -> int:
    """Child process: `cptstream train`, recording the trainable weights right after the model loads."""
    from cptstream.train import loop
    from cptstream.train.cli import main

    load_model = loop.load_model

    def load_and_describe(config, backend_name, dtype):
        loaded = load_model(config, backend_name, dtype)
        Path(report_path).write_text(json.dumps(describe_trainable(loaded.model)), encoding="utf-8")
        return loaded

    loop.load_model = load_and_describe
    return main(["train", "--config", config_path, "--backend", backend])


def describe_trainable(model) -> dict:
    """Count the trainable weights by group (LoRA or full `modules_to_save` copy) and dtype.

    `tied_copies` counts `embed_tokens` and `lm_head` trainable weights that share storage, which
    is how a tied model keeps one embedding matrix when both are trained.
    """
    groups: dict[str, dict[str, int]] = {}
    pointers: dict[str, set[int]] = {"embed_tokens": set(), "lm_head": set()}
    counted: set[int] = set()
    # remove_duplicate=False lists a shared weight under every name, so a tie is visible; the
    # sizes still count each tensor once.
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not parameter.requires_grad:
            continue
        if parameter.data_ptr() not in counted:
            counted.add(parameter.data_ptr())
            group = "embeddings" if ".modules_to_save." in name else "lora"
            dtype = str(parameter.dtype).removeprefix("torch.")
            groups.setdefault(group, {})
            groups[group][dtype] = groups[group].get(dtype, 0) + parameter.numel()
        for module, storage in pointers.items():
            if module in name:
                storage.add(parameter.data_ptr())
    return {"weights": groups, "tied_copies": len(pointers["embed_tokens"] & pointers["lm_head"])}


# ---- report ----


def print_table(results: dict[str, dict]) -> None:
    """Print one row per backend."""
    header = f"{'backend':<8} {'status':<8} {'steps':>5} {'final loss':>10} {'eval loss':>17} "
    header += f"{'tokens/s':>10} {'peak GiB':>8} {'MFU':>6} {'wall s':>7}"
    print(header)
    for backend, r in results.items():
        evals = "-"
        if r.get("eval_loss_first") is not None:
            evals = f"{r['eval_loss_first']:.3f} -> {r['eval_loss_last']:.3f}"
        cells = [
            f"{backend:<8}",
            f"{r['status']:<8}",
            f"{r.get('steps', 0):>5}",
            f"{r['final_loss']:>10.4f}" if "final_loss" in r else f"{'-':>10}",
            f"{evals:>17}",
            f"{r['tokens_per_s']:>10,.0f}" if r.get("tokens_per_s") else f"{'-':>10}",
            f"{r['peak_mem_gib']:>8.2f}" if r.get("peak_mem_gib") is not None else f"{'-':>8}",
            f"{r['mfu']:>6.1%}" if r.get("mfu") is not None else f"{'-':>6}",
            f"{r['wall_s']:>7.1f}" if "wall_s" in r else f"{'-':>7}",
        ]
        print(" ".join(cells))
        if r.get("reason"):
            print(f"  {backend}: {r['reason']}")


# ---- command line ----


def run(args: argparse.Namespace) -> int:
    """Build the model, train every requested backend and write the report; return the exit status."""
    import torch
    import yaml
    from cptstream.train.manifest import load_manifest

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(args.data)
    cuda = args.device == "cuda" and torch.cuda.is_available()
    report: dict[str, Any] = {
        "preset": "tiny" if args.tiny else "qwen2.5-0.5b",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": _versions(),
        "steps": args.steps,
        "data": {
            "path": str(args.data.resolve()),
            "seq_len": manifest.seq_len,
            "train_rows": manifest.rows("train"),
            "validation_rows": manifest.rows("validation"),
            "micro_batch_size": args.micro_batch_size,
            "grad_accum": args.grad_accum,
        },
        "backends": {},
    }
    if args.device == "cuda" and not cuda:
        say("--device cuda but torch sees no CUDA device; the unsloth run is skipped and hf runs on the CPU")

    status = 0
    try:
        report["model"] = build_model(args.tokenizer, work / "model", TINY if args.tiny else QWEN25_05B, bf16=cuda)
    except (OSError, ValueError) as err:
        say(f"model build failed: {err}")
        report["model"] = {"error": str(err)}
        status |= MODEL_BUILD_FAILED

    for backend in args.backends if not status else ():
        if backend == "unsloth" and not cuda:
            reason = "skipped: Unsloth needs an NVIDIA GPU and this run has no CUDA device"
            say(f"unsloth: {reason}")
            report["backends"][backend] = {"status": "skipped", "reason": reason}
            continue
        config = run_config(work / "model", args.data.resolve(), work / "runs" / backend, args, manifest.seq_len)
        config_path = work / f"{backend}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        result = run_backend(backend, config_path, work, args)
        report["backends"][backend] = result
        if result["status"] == "failed":
            status |= FAILURE_BITS[backend]

    print_table(report["backends"])
    report["exit_status"] = status
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    failed = [name for name, bit in FAILURE_BITS.items() if status & bit]
    if status:
        say(f"FAILED: {', '.join(failed) or 'model build'} (exit status {status})")
    return status


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("cptstream", "torch", "transformers", "peft", "unsloth", "unsloth_zoo", "trl", "bitsandbytes"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the `run` and `corpus` subcommands (and the internal `_train-one`)."""
    parser = argparse.ArgumentParser(prog="python benches/gpu_train.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="build the model and train each backend for --steps steps")
    run_parser.add_argument("--data", type=Path, required=True, help="shard directory from `cptstream shard`")
    run_parser.add_argument("--tokenizer", type=Path, required=True, help="directory with the shards' tokenizer.json")
    run_parser.add_argument("--work", type=Path, required=True, help="directory for the model, configs and runs")
    run_parser.add_argument("--json", type=Path, help="write the report here as JSON")
    run_parser.add_argument(
        "--backends", default="unsloth,hf", help="comma-separated, in run order (default: %(default)s)"
    )
    run_parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu hides the GPUs from the runs"
    )
    run_parser.add_argument("--tiny", action="store_true", help="2-layer width-64 model for a CPU smoke run")
    run_parser.add_argument("--steps", type=int, default=30, help="optimizer steps per backend (default: %(default)s)")
    run_parser.add_argument(
        "--micro-batch-size", type=int, default=4, help="rows per forward pass (default: %(default)s)"
    )
    run_parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default: %(default)s)")
    run_parser.add_argument("--eval-batches", type=int, default=8, help="validation micro-batches per evaluation")
    run_parser.add_argument(
        "--warmup-steps", type=int, default=5, help="first steps left out of tokens/s (default: %(default)s)"
    )
    run_parser.add_argument(
        "--timeout-s", type=int, default=600, help="limit of one backend's run in seconds (default: %(default)s)"
    )

    corpus_parser = commands.add_parser("corpus", help="write a fallback corpus of standard-library docstrings")
    corpus_parser.add_argument("--output", type=Path, required=True, help="directory for stdlib-docstrings.jsonl")
    corpus_parser.add_argument("--mb", type=float, default=8.0, help="megabytes of text (default: %(default)s)")

    child = commands.add_parser("_train-one", help=argparse.SUPPRESS)
    child.add_argument("config")
    child.add_argument("backend", choices=BACKENDS)
    child.add_argument("trainable_report")

    args = parser.parse_args(argv)
    if args.command == "run":
        args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
        unknown = sorted(set(args.backends) - set(BACKENDS))
        if unknown or not args.backends:
            parser.error(
                f"--backends {','.join(args.backends)!r} is invalid: expected names from {', '.join(BACKENDS)}"
            )
        for name in ("steps", "micro_batch_size", "grad_accum", "eval_batches", "timeout_s"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not (args.tokenizer / "tokenizer.json").is_file():
            parser.error(f"--tokenizer {args.tokenizer}: tokenizer.json not found there")
        if not (args.data / "manifest.json").is_file():
            parser.error(f"--data {args.data}: manifest.json not found there; run `cptstream shard` first")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand and return its exit status."""
    args = parse_args(argv)
    if args.command == "corpus":
        write_stdlib_corpus(args.output, args.mb)
        return 0
    if args.command == "_train-one":
        return train_one(args.config, args.backend, args.trainable_report)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
