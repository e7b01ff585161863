"""Model loading and LoRA setup for the two backends; the only module that imports unsloth or peft.

- `unsloth`: `FastLanguageModel.from_pretrained` and `FastLanguageModel.get_peft_model`, with
  `embed_tokens` and `lm_head` in `target_modules` (Unsloth moves them to `modules_to_save`), and
  its offloaded gradient checkpointing. Training runs in cptstream's own loop, not in
  `UnslothTrainer`: the loop owns the resumable data stream, the per-document masking and the
  checkpoint format, so both backends share one tested data path. The one thing UnslothTrainer
  adds for continued pretraining, a lower `embedding_learning_rate` for the `modules_to_save`
  weights, is the same optimizer split that `param_groups` builds.
- `hf`: transformers `AutoModelForCausalLM` and `peft.get_peft_model` with the same settings.

Both return a `peft.PeftModel`, so adapters save and load the same way.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cptstream.train.config import RunConfig

__all__ = ["LoadedModel", "load_model", "param_groups", "resolve_backend", "resolve_dtype"]

logger = logging.getLogger("cptstream")


@dataclass
class LoadedModel:
    """A base model with LoRA adapters, ready to train."""

    model: torch.nn.Module
    """The `peft.PeftModel`."""
    backend: str
    """`unsloth` or `hf`."""
    layout: str
    """Attention layout the batches need: `mask` (4D mask), `varlen` (flash attention) or `unsloth`."""
    autocast_dtype: torch.dtype | None
    """dtype for `torch.autocast` around the forward pass, or None for plain fp32."""
    device: torch.device
    """Device of the trainable weights."""
    mask_dtype: torch.dtype = torch.bool
    """dtype of the 4D mask in the `mask` layout: bool for SDPA, float32 (additive) for eager attention."""


def resolve_backend(requested: str) -> str:
    """Return `unsloth` or `hf` for the configured `model.backend`.

    Raises:
        ValueError: `unsloth` was requested without CUDA or without the package.
    """
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if torch.cuda.is_available() and has_unsloth else "hf"
    if requested == "unsloth" and not torch.cuda.is_available():
        raise ValueError("model.backend = 'unsloth' needs an NVIDIA GPU, and CUDA is not available; use --backend hf")
    if requested == "unsloth" and not has_unsloth:
        raise ValueError("model.backend = 'unsloth' but unsloth is not installed; pip install 'cptstream[gpu]'")
    return requested


def resolve_dtype(precision: str) -> torch.dtype:
    """Return the weight dtype for `model.precision`.

    Raises:
        ValueError: bf16 was requested on hardware without it.
    """
    bf16_available = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_available else torch.float32
    if precision == "bf16" and not bf16_available:
        raise ValueError("model.precision = 'bf16' but this machine has no CUDA device with bf16; use fp32 or auto")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_model(config: RunConfig, backend: str, dtype: torch.dtype) -> LoadedModel:
    """Load the base model from `model.path` and add LoRA adapters as the config sets them."""
    if backend == "unsloth":
        return _load_unsloth(config, dtype)
    return _load_hf(config, dtype)


def _load_hf(config: RunConfig, dtype: torch.dtype) -> LoadedModel:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    attn = config.model.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        str(Path(config.model.path).resolve()), dtype=dtype, attn_implementation=attn
    )
    model.to(device)
    model.config.use_cache = False
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)

    # Trainable weights stay fp32 master copies under bf16 autocast, as in mixed-precision training.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()

    layout = "varlen" if attn == "flash_attention_2" else "mask"
    autocast = dtype if dtype != torch.float32 else None
    mask_dtype = torch.bool if attn == "sdpa" else torch.float32
    return LoadedModel(
        model=model, backend="hf", layout=layout, autocast_dtype=autocast, device=device, mask_dtype=mask_dtype
    )


def _load_unsloth(config: RunConfig, dtype: torch.dtype) -> LoadedModel:
    # NOTE: this path needs CUDA and the unsloth package, so the CPU test suite never runs it.
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(Path(config.model.path).resolve()),
        max_seq_length=config.model.max_seq_length,
        dtype=dtype,
        load_in_4bit=config.model.load_in_4bit,
    )
    lora = config.lora
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        target_modules=list(lora.target_modules) + list(lora.modules_to_save),
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        use_gradient_checkpointing="unsloth" if config.model.gradient_checkpointing else False,
        random_state=config.train.seed,
        use_rslora=lora.use_rslora,
        loftq_config=None,
    )
    FastLanguageModel.for_training(model)
    device = torch.device("cuda", torch.cuda.current_device())
    return LoadedModel(model=model, backend="unsloth", layout="unsloth", autocast_dtype=dtype, device=device)


def param_groups(model: torch.nn.Module, lr: float, embedding_lr: float | None, weight_decay: float) -> list[dict]:
    """Split the trainable weights into LoRA weights at `lr` and `modules_to_save` weights at `embedding_lr`.

    peft names a full trainable copy `<module>.modules_to_save.<adapter>.weight`; that is how the
    embedding and output head are found, the same rule UnslothTrainer applies.

    Returns:
        AdamW parameter groups, each with a `name` entry (`lora` or `embeddings`).
    """
    lora_weights, embedding_weights = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_embedding = ".modules_to_save." in name
        (embedding_weights if is_embedding else lora_weights).append(parameter)
    groups = [{"name": "lora", "params": lora_weights, "lr": lr, "weight_decay": weight_decay}]
    if embedding_weights:
        groups.append(
            {
                "name": "embeddings",
                "params": embedding_weights,
                "lr": embedding_lr if embedding_lr is not None else lr,
                "weight_decay": weight_decay,
            }
        )
    return groups
