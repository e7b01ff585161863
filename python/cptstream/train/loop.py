"""The training loop: checks, model setup, accumulation steps, evaluation, checkpoints and resume.

One optimizer step reads its `grad_accum` micro-batches first and counts their loss targets
(labels that are not -100 after the shift). Each micro-batch loss is a sum divided by that total,
so the step's gradient is the mean over exactly those tokens, however the documents fall into
micro-batches. With several ranks the count is summed across ranks and the loss scaled by the
world size, because DDP averages gradients.

Resume is exact on CPU with a fixed seed: the adapter, the optimizer, the scheduler, the RNG
states and the dataset position are restored, and the DataLoader draws worker seeds from a
private generator, so a resumed run repeats the per-step losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from cptstream.data import DataExhaustedError, PackedDataset, PackedLoader
from cptstream.lock import DirLock
from cptstream.tokenizer_files import copy_tokenizer_files
from cptstream.train.batch import count_targets, model_inputs
from cptstream.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cptstream.train.checks import check_model_fits_shards
from cptstream.train.config import ConfigError, RunConfig, derive_max_steps
from cptstream.train.lora import (
    LoadedModel,
    configure_environment,
    load_model,
    param_groups,
    resolve_backend,
    resolve_dtype,
)
from cptstream.train.manifest import load_manifest
from cptstream.train.metrics import (
    LossAverage,
    MetricsWriter,
    format_step_line,
    peak_flops,
    training_flops_per_token,
)

__all__ = ["lr_factor", "run"]

logger = logging.getLogger("cptstream")


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Return the learning-rate multiplier for the update at 0-based `step`: linear warmup, then decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def run(config: RunConfig, *, resume: bool = False, stop_after: int | None = None) -> int:
    """Train as `config` sets, holding the output directory's lock.

    Args:
        config: the resolved run config.
        resume: continue from the newest checkpoint in the output directory, if any.
        stop_after: save a checkpoint and return after this step, as a preempted job would.

    Returns:
        0 when training finished or stopped at `stop_after`; 128 + the signal number when stopped
        by SIGTERM or SIGINT (after saving a checkpoint).

    Raises:
        ConfigError, CheckError, LockHeldError, DataExhaustedError: before step 1, with the values
            and the fix in the message.
    """
    for name, value in (
        ("train.output", config.train.output),
        ("data.path", config.data.path),
        ("model.path", config.model.path),
    ):
        if not value:
            raise ConfigError(f"{config.source}: {name} is empty; set it in the file or with its command-line flag")

    # Before transformers, peft or unsloth is imported, because they read these variables on import.
    configure_environment(config)
    rank, world_size = _init_distributed()
    output = Path(config.train.output)
    lock = DirLock(output) if rank == 0 else contextlib.nullcontext()
    with lock:
        return _train(config, output, rank, world_size, resume, stop_after)


def _init_distributed() -> tuple[int, int]:
    # NOTE: multi-rank training (torchrun) follows the standard DDP recipe but has not been run on several GPUs.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _train(config: RunConfig, output: Path, rank: int, world_size: int, resume: bool, stop_after: int | None) -> int:
    model_dir = Path(config.model.path)
    manifest = load_manifest(config.data.path)

    # Everything that can fail on the data fails here, before the model loads.
    if rank == 0:
        check_model_fits_shards(model_dir, manifest, config.model.max_seq_length, output / ".cptstream")
    _barrier()
    checkpoint = latest_checkpoint(output) if resume else None
    if not resume and latest_checkpoint(output) is not None:
        raise ConfigError(f"{output} already contains checkpoints; pass --resume to continue or choose a new --output")
    if resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from step 0", output)

    backend = resolve_backend(config.model.backend)
    dtype = resolve_dtype(config.model.precision)
    seed = config.train.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loaded = load_model(config, backend, dtype)
    logger.info("backend %s, weights %s, attention layout %s, device %s", backend, dtype, loaded.layout, loaded.device)

    peft_model = loaded.model
    model = peft_model
    if world_size > 1:
        device_ids = [loaded.device.index] if loaded.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(peft_model, device_ids=device_ids)
    optim = config.optim
    groups = param_groups(peft_model, optim.lr, optim.embedding_lr, optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)

    max_steps = derive_max_steps(config, manifest.rows("train"), world_size)
    warmup_steps = math.ceil(optim.warmup_ratio * max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, max_steps, optim.schedule, optim.min_lr_ratio)
    )

    data = config.data
    dataset = PackedDataset(
        data.path,
        micro_batch_size=data.micro_batch_size,
        seed=seed,
        shuffle_block=data.shuffle_block,
        num_workers=data.num_workers,
        rank=rank,
        world_size=world_size,
        manifest=manifest,
    )
    loader = PackedLoader(dataset, pin_memory=loaded.device.type == "cuda")

    step, tokens_seen = 0, 0
    loss_average = LossAverage()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, peft_model, optimizer)
        if state["max_steps"] != max_steps:
            raise ConfigError(
                f"{checkpoint} was saved by a run of {state['max_steps']} steps, this config gives {max_steps}; "
                f"resume with the same max_steps, epochs, batch sizes and world size"
            )
        scheduler.load_state_dict(state["scheduler"])
        dataset.load_state_dict(state["dataset"])
        loss_average.load_state_dict(state["loss_average"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint, step, dataset.epoch)

    writer = (
        MetricsWriter(output, resume_step=step if checkpoint is not None else None, tensorboard=config.log.tensorboard)
        if rank == 0
        else None
    )
    flops_per_token = training_flops_per_token(peft_model)
    peak = peak_flops(config.log.peak_tflops)
    logger.info(
        "%d train rows, %d steps of %d rows (%d warmup), lr %.1e, embedding lr %.1e",
        manifest.rows("train"),
        max_steps,
        world_size * data.micro_batch_size * data.grad_accum,
        warmup_steps,
        optim.lr,
        groups[-1]["lr"],
    )

    def save(current_step: int) -> Path | None:
        if rank != 0:
            return None
        trainer_state = {
            "max_steps": max_steps,
            "tokens_seen": tokens_seen,
            "scheduler": scheduler.state_dict(),
            "dataset": dataset.state_dict(),
            "loss_average": loss_average.state_dict(),
            "world_size": world_size,
            "config": config.to_dict(),
        }
        return save_checkpoint(
            output,
            step=current_step,
            model=peft_model,
            optimizer=optimizer,
            trainer_state=trainer_state,
            keep=config.checkpoint.keep,
        )

    stop_signal: list[int] = []
    previous_handlers = _install_signal_handlers(stop_signal)
    progress = _progress_bar(rank, step, max_steps)
    batches = iter(loader)
    model.train()
    redirect = logging_redirect_tqdm()
    redirect.__enter__()
    try:
        # A baseline before the first update, so the log shows how far validation perplexity falls.
        if step == 0:
            _evaluate_and_log(model, loaded, config, manifest, rank, world_size, step, writer)

        while step < max_steps:
            started = time.perf_counter()
            micro_batches = [_next_batch(batches, dataset, step) for _ in range(data.grad_accum)]

            # The loss of the step averages over every target of all its micro-batches (and ranks).
            targets = torch.tensor(sum(count_targets(batch["labels"]) for batch in micro_batches), dtype=torch.float64)
            step_tokens = torch.tensor(
                sum(int(batch["num_tokens"].sum()) for batch in micro_batches), dtype=torch.float64
            )
            if world_size > 1:
                totals = torch.stack([targets, step_tokens]).to(loaded.device)
                torch.distributed.all_reduce(totals)
                targets, step_tokens = totals.cpu()
            step_loss = 0.0
            for index, batch in enumerate(micro_batches):
                sync = index == len(micro_batches) - 1 or world_size == 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    loss = _forward_loss(model, loaded, batch, max(1.0, float(targets))) * world_size
                    loss.backward()
                step_loss += loss.item() / world_size
            if world_size > 1:
                reduced = torch.tensor([step_loss], device=loaded.device)
                torch.distributed.all_reduce(reduced)
                step_loss = float(reduced) / world_size

            trainable = [p for group in optimizer.param_groups for p in group["params"]]
            max_norm = optim.max_grad_norm if optim.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            lrs = [group["lr"] for group in optimizer.param_groups]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(step_tokens)
            smoothed = loss_average.update(step_loss)
            elapsed = time.perf_counter() - started
            progress.update(1)

            if step % config.log.every == 0 or step == max_steps:
                values = {
                    "train/loss": step_loss,
                    "train/loss_ema": smoothed,
                    "train/lr": lrs[0],
                    "train/lr_embeddings": lrs[-1],
                    "train/grad_norm": grad_norm,
                    "train/step_ms": 1000 * elapsed,
                    "train/tok_per_sec": float(step_tokens) / elapsed,
                    "train/tokens": tokens_seen,
                    "train/targets": int(targets),
                    "train/epoch": dataset.epoch,
                }
                if loaded.device.type == "cuda":
                    values["gpu/mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    if peak is not None:
                        values["train/mfu"] = flops_per_token * float(step_tokens) / elapsed / (peak * world_size)
                if writer is not None:
                    writer.write(step, values)
                    progress.set_postfix_str(f"loss {smoothed:.4f}")
                    logger.info(format_step_line(step, max_steps, values))

            if step % config.log.eval_every == 0 or step == max_steps:
                _evaluate_and_log(model, loaded, config, manifest, rank, world_size, step, writer)

            if step % config.checkpoint.every == 0 or step == max_steps:
                save(step)
            if stop_signal or step == stop_after:
                break
    finally:
        progress.close()
        redirect.__exit__(None, None, None)
        _restore_signal_handlers(previous_handlers)
        if writer is not None:
            writer.close()

    if step < max_steps:
        path = save(step)
        reason = f"signal {signal.Signals(stop_signal[0]).name}" if stop_signal else f"--stop-after {stop_after}"
        logger.info("stopped by %s at step %d/%d; checkpoint %s; continue with --resume", reason, step, max_steps, path)
        return 128 + stop_signal[0] if stop_signal else 0

    if rank == 0:
        _save_adapter(peft_model, model_dir, output / "adapter")
    return 0


def _next_batch(batches: Any, dataset: PackedDataset, step: int) -> dict[str, torch.Tensor]:
    batch = next(batches, None)
    if batch is None:
        raise DataExhaustedError(
            f"the train stream ended at step {step}, epoch {dataset.epoch}; set epochs or max_steps lower"
        )
    return batch


def _forward_loss(
    model: torch.nn.Module, loaded: LoadedModel, batch: dict[str, torch.Tensor], num_targets: float
) -> torch.Tensor:
    inputs = model_inputs(batch, loaded.layout, loaded.device, loaded.mask_dtype)
    autocast = (
        torch.autocast(loaded.device.type, dtype=loaded.autocast_dtype)
        if loaded.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        return model(**inputs, num_items_in_batch=num_targets, use_cache=False).loss


def _evaluate_and_log(model, loaded, config, manifest, rank, world_size, step, writer) -> None:
    if manifest.rows("validation") == 0:
        return
    try:
        dataset = PackedDataset(
            config.data.path,
            micro_batch_size=config.data.micro_batch_size,
            split="validation",
            shuffle=False,
            epochs=1,
            rank=rank,
            world_size=world_size,
            manifest=manifest,
        )
    except DataExhaustedError as err:
        logger.warning("evaluation skipped: %s", err)
        return

    # Sums of token losses and targets, so the perplexity weights every target equally.
    totals = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(PackedLoader(dataset)):
            if config.data.eval_max_batches is not None and index >= config.data.eval_max_batches:
                break
            targets = count_targets(batch["labels"])
            if targets == 0:
                continue
            loss = _forward_loss(model, loaded, batch, float(targets))
            totals += torch.tensor([loss.item() * targets, targets], dtype=torch.float64)
    model.train()
    if world_size > 1:
        totals = totals.to(loaded.device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()

    loss_sum, target_count = totals.tolist()
    if writer is None or target_count == 0:
        return
    mean = loss_sum / target_count
    values = {"eval/loss": mean, "eval/ppl": math.exp(mean), "eval/targets": int(target_count)}
    writer.write(step, values)
    logger.info("step %d | eval loss %.4f | ppl %.3f | %d targets", step, mean, values["eval/ppl"], int(target_count))


def _save_adapter(model: torch.nn.Module, model_dir: Path, destination: Path) -> None:
    temporary = destination.with_name(f".tmp-{destination.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(str(temporary))
    copy_tokenizer_files(temporary, model_dir)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(temporary, destination)
    logger.info("saved adapter and tokenizer to %s", destination)


def _install_signal_handlers(stop_signal: list[int]) -> dict[int, Any]:
    """Make SIGTERM and SIGINT finish the current step and checkpoint; a second SIGINT interrupts at once."""

    def handle(signum: int, _frame: Any) -> None:
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_signal.append(signum)
        logger.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
            previous[signum] = signal.signal(signum, handle)
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _progress_bar(rank: int, step: int, max_steps: int) -> Any:
    from tqdm.auto import tqdm

    # disable=None turns the bar off when stderr is not a terminal, which keeps CI logs clean.
    return tqdm(total=max_steps, initial=step, disable=None if rank == 0 else True, unit="step", dynamic_ncols=True)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
