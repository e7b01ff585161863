"""Training metrics: one log line per logging step, `metrics.jsonl`, optional TensorBoard, MFU.

Keys follow `section/name` (`train/loss`, `train/tok_per_sec`, `eval/ppl`). The log line shows a
debiased exponential moving average of the loss, and the JSON record has the exact step loss too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["LossAverage", "MetricsWriter", "format_step_line", "peak_flops", "training_flops_per_token"]

logger = logging.getLogger("cptstream")

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (A100: 312 TFLOP/s, H100/H200 SXM: 989 TFLOP/s).
# Other GPUs need log.peak_tflops, else MFU is left out.
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


class LossAverage:
    """Debiased exponential moving average of the loss (bias correction as in Adam)."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.value = 0.0
        self.count = 0

    def update(self, loss: float) -> float:
        """Add one step's loss and return the debiased average."""
        self.count += 1
        self.value = self.beta * self.value + (1 - self.beta) * loss
        return self.value / (1 - self.beta**self.count)

    def state_dict(self) -> dict[str, float]:
        """Return the average's state for a checkpoint."""
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore a `state_dict()`."""
        self.value = float(state["value"])
        self.count = int(state["count"])


def peak_flops(configured_tflops: float | None) -> float | None:
    """Return the accelerator's peak FLOP/s: the configured value, a known GPU's, or None."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def training_flops_per_token(model: torch.nn.Module) -> float:
    """Estimate the FLOPs per trained token: 4 per frozen weight and 6 per trainable weight.

    A frozen weight does the forward matmul and the input-gradient matmul (2 + 2 FLOPs per
    weight), and a trained one also the weight gradient (+2). Embedding lookups cost no matmul
    and attention scores are left out, so this is an estimate that undercounts long sequences.
    """
    flops = 0.0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            continue
        flops += (6 if parameter.requires_grad else 4) * parameter.numel()
    return flops


def format_step_line(step: int, max_steps: int, values: dict[str, Any]) -> str:
    """Return the human-readable log line of one step."""
    width = len(str(max_steps))
    parts = [
        f"step {step:0{width}d}/{max_steps:0{width}d}",
        f"loss {values['train/loss_ema']:.4f}",
        f"lr {values['train/lr']:.1e}",
        f"grad_norm {values['train/grad_norm']:.2f}",
        f"dt {values['train/step_ms']:.0f}ms",
        f"tok/s {values['train/tok_per_sec']:,.0f}",
    ]
    if "gpu/mem_gib" in values:
        parts.append(f"mem {values['gpu/mem_gib']:.1f}GiB")
    if "train/mfu" in values:
        parts.append(f"mfu {100 * values['train/mfu']:.1f}%")
    return " | ".join(parts)


class MetricsWriter:
    """Appends metric records to `metrics.jsonl` and, when enabled, to TensorBoard.

    Args:
        output: the run directory.
        resume_step: on resume, records after this step (written after the checkpoint and lost
            with the interrupted run) are dropped, so each step appears once.
        tensorboard: also write TensorBoard events to `output/tensorboard`.
    """

    def __init__(self, output: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        self.path = output / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())

        self._tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError(
                    f"--tensorboard needs the tensorboard package ({err}); pip install tensorboard"
                ) from err
            self._tensorboard = SummaryWriter(str(output / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Append one record for `step`."""
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close the outputs."""
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
