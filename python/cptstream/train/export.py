"""`cptstream export`: merge a trained LoRA adapter into its base model and save safetensors.

The base model is the one recorded in the adapter's `adapter_config.json`
(`base_model_name_or_path`), unless `--base` names another local copy. Merging folds each LoRA
update into its linear weight and replaces `embed_tokens` and `lm_head` by their trained copies,
so the result loads with plain transformers and needs no peft.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from cptstream.tokenizer_files import copy_tokenizer_files

__all__ = ["export_merged"]

logger = logging.getLogger("cptstream")


def export_merged(adapter_dir: str | Path, output_dir: str | Path, *, base: str | Path | None = None) -> Path:
    """Write the base model with the adapter merged in, as safetensors, plus the adapter's tokenizer files.

    Args:
        adapter_dir: a peft adapter directory (`OUTPUT/adapter` or a checkpoint's `adapter/`).
        output_dir: directory to write; it must not exist or must be empty.
        base: local base model directory. Default: the adapter config's `base_model_name_or_path`.

    Returns:
        `output_dir`.

    Raises:
        FileNotFoundError: the adapter or the base model is missing.
        ValueError: `output_dir` is not empty.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass the adapter directory that `cptstream train` wrote")
    base_path = Path(base) if base is not None else Path(json.loads(config_file.read_text())["base_model_name_or_path"])
    if not (base_path / "config.json").is_file():
        raise FileNotFoundError(f"base model {base_path} not found (from {config_file}); pass --base with a local copy")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty; choose a new --output directory")

    # The base path comes from adapter_config.json, an input file, so code shipped there never runs.
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype="auto", trust_remote_code=False)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = model.merge_and_unload()

    # The merge keeps the base model's dtype: peft copies the fp32 trained weights into the loaded modules.
    temporary = output_dir.with_name(f".tmp-{output_dir.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    with torch.no_grad():
        merged.save_pretrained(str(temporary))
    copy_tokenizer_files(temporary, adapter_dir, base_path)
    if output_dir.exists():
        output_dir.rmdir()
    os.replace(temporary, output_dir)
    logger.info("merged %s into %s and wrote %s", adapter_dir, base_path, output_dir)
    return output_dir
