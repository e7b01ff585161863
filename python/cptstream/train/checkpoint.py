"""Atomic training checkpoints: adapter, optimizer, scheduler, RNG states and data position.

A checkpoint is built in `checkpoints/.tmp-step_N-PID/` and renamed to `checkpoints/step_N/` with
`os.replace`, so a directory named `step_N` is always complete. Nothing is unpickled: tensors go
through safetensors or `torch.load(weights_only=True)` (the optimizer state), everything else
through JSON.

Layout of `step_00000042/`:
    adapter/                 peft `save_pretrained` (adapter_config.json, adapter_model.safetensors)
    optimizer.pt             `optimizer.state_dict()`
    rng.safetensors          torch CPU and CUDA generator states, numpy's MT19937 key
    trainer_state.json       step, scheduler, dataset position, python and numpy RNG scalars, config
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["CHECKPOINT_VERSION", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger("cptstream")

CHECKPOINT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def latest_checkpoint(output: Path) -> Path | None:
    """Return the newest complete checkpoint directory under `output`, or None."""
    root = _checkpoint_root(output)
    if not root.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / "trainer_state.json").is_file()
    )
    return steps[-1][1] if steps else None


def save_checkpoint(
    output: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint for `step` atomically, then delete all but the newest `keep`.

    Args:
        output: the run directory.
        step: optimizer steps completed.
        model: the peft model; only its adapter and `modules_to_save` weights are written.
        optimizer: the optimizer.
        trainer_state: JSON-serializable state (step, scheduler, dataset position, ...); the RNG
            states are added here.
        keep: number of checkpoints to keep.

    Returns:
        The checkpoint directory.
    """
    root = _checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.is_dir() and (final / "trainer_state.json").is_file():
        return final

    temporary = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()

    model.save_pretrained(str(temporary / "adapter"))
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")

    # numpy's legacy global generator is saved because user code and libraries may draw from it.
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    save_file(tensors, str(temporary / "rng.safetensors"))

    python_version, python_internal, python_gauss = random.getstate()
    state = dict(
        trainer_state,
        version=CHECKPOINT_VERSION,
        step=step,
        rng={
            "python": [python_version, list(python_internal), python_gauss],
            "numpy": {
                "position": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
        },
    )
    # Written last, because its presence marks the checkpoint complete.
    (temporary / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    _fsync_tree(temporary)

    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    logger.info("saved checkpoint %s", final)

    _prune(root, keep)
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    complete = sorted(path for path in root.iterdir() if _STEP_DIR.match(path.name))
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-*"):
        if not path.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load adapter weights and optimizer state into the objects, restore the RNGs, and return trainer_state.json.

    Raises:
        ValueError: the checkpoint has another version, or its adapter does not match the model.
    """
    from peft import set_peft_model_state_dict

    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {state.get('version')!r}, this cptstream reads {CHECKPOINT_VERSION}"
        )

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing_adapter = [key for key in result.missing_keys if "lora_" in key or "modules_to_save" in key]
    if result.unexpected_keys or missing_adapter:
        raise ValueError(
            f"{path}/adapter does not match the model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing_adapter[:3]}; resume with the same model and lora settings"
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))

    tensors = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [
        tensors[f"torch_cuda_{index}"] for index in range(torch.cuda.device_count()) if f"torch_cuda_{index}" in tensors
    ]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    numpy = state["rng"]["numpy"]
    np.random.set_state(
        (
            "MT19937",
            tensors["numpy_keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python_version, python_internal, python_gauss = state["rng"]["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    return state
