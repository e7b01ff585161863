"""Model loading and LoRA setup for the two backends; the only module that imports unsloth or peft.

- `unsloth`: `FastLanguageModel.from_pretrained` and `FastLanguageModel.get_peft_model`, with
  `embed_tokens` and `lm_head` in `modules_to_save`, and its offloaded gradient checkpointing.
  Training runs in cptstream's own loop, not in `UnslothTrainer`: the loop owns the resumable
  data stream, the per-document masking and the checkpoint format, so both backends share one
  tested data path. The one thing UnslothTrainer adds for continued pretraining, a lower
  `embedding_learning_rate` for the `modules_to_save` weights, is the same optimizer split that
  `param_groups` builds.
- `hf`: transformers `AutoModelForCausalLM` and `peft.get_peft_model` with the same settings.

Both return a `peft.PeftModel`, so adapters save and load the same way. In both, every trainable
weight is an fp32 master copy, and a model with tied embeddings (`tie_word_embeddings`, as in
Qwen2.5 0.5B-3B) trains one matrix shared by `embed_tokens` and `lm_head`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cptstream.train.config import RunConfig

__all__ = [
    "LoadedModel",
    "configure_environment",
    "load_model",
    "param_groups",
    "resolve_backend",
    "resolve_dtype",
    "unsloth_cache_dir",
]

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


def unsloth_cache_dir(config: RunConfig) -> Path:
    """Return `<output>/.cptstream/unsloth`, the directory for the files Unsloth writes during a run."""
    return Path(config.train.output).resolve() / ".cptstream" / "unsloth"


def configure_environment(config: RunConfig) -> None:
    """Set the environment variables that keep training offline and its files in the output directory.

    Each variable is set only when absent, so a value the user exported wins. The base model is a
    local directory, so `HF_HUB_OFFLINE=1` stops huggingface_hub from querying the Hub and
    `UNSLOTH_DISABLE_STATISTICS=1` stops Unsloth from downloading its usage-statistics file.
    `UNSLOTH_COMPILE_LOCATION` moves `unsloth_compiled_cache/` from the current directory to
    `unsloth_cache_dir(config) / "compiled"`.

    NOTE: huggingface_hub reads `HF_HUB_OFFLINE` and unsloth_zoo reads `UNSLOTH_COMPILE_LOCATION`
    once, when they are first imported. So this must run before anything imports transformers,
    peft or unsloth, which is why `cptstream train` calls it first.
    """
    if Path(config.model.path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(unsloth_cache_dir(config) / "compiled"))


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
        str(Path(config.model.path).resolve()),
        dtype=dtype,
        attn_implementation=attn,
        trust_remote_code=config.model.trust_remote_code,
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
        ensure_weight_tying=_keeps_tie(model, lora.modules_to_save),
    )
    model = get_peft_model(model, peft_config)
    _upcast_trainable(model)

    layout = "varlen" if attn == "flash_attention_2" else "mask"
    autocast = dtype if dtype != torch.float32 else None
    mask_dtype = torch.bool if attn == "sdpa" else torch.float32
    return LoadedModel(
        model=model, backend="hf", layout=layout, autocast_dtype=autocast, device=device, mask_dtype=mask_dtype
    )


def _load_unsloth(config: RunConfig, dtype: torch.dtype) -> LoadedModel:
    # NOTE: the real path needs CUDA and the unsloth package. The CPU tests run it against a stand-in
    # FastLanguageModel that checks the arguments, so Unsloth's own behaviour is not tested here.
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(Path(config.model.path).resolve()),
        max_seq_length=config.model.max_seq_length,
        dtype=dtype,
        load_in_4bit=config.model.load_in_4bit,
        trust_remote_code=config.model.trust_remote_code,
    )
    lora = config.lora
    buffers = unsloth_cache_dir(config) / "buffers"
    with _relative_name_or_path(model):
        # Unsloth 2026.10.9 keeps the tie itself. For a tied model with both names in modules_to_save,
        # it removes lm_head from the list and sets peft's ensure_weight_tying, as _keeps_tie does for hf.
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            target_modules=list(lora.target_modules),
            modules_to_save=list(lora.modules_to_save) or None,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias="none",
            use_gradient_checkpointing="unsloth" if config.model.gradient_checkpointing else False,
            random_state=config.train.seed,
            use_rslora=lora.use_rslora,
            loftq_config=None,
            temporary_location=str(buffers),
        )
    FastLanguageModel.for_training(model)

    # Unsloth 2026.10.9 upcasts the LoRA weights to fp32 but keeps the modules_to_save copies in
    # the model's dtype (it promotes only fp16). AdamW moves a weight by about the learning rate
    # per step, and bf16 keeps 8 significant bits, so at embedding_lr 5e-6 every update to a bf16
    # weight larger than about 1.3e-3 in magnitude would round away.
    _upcast_trainable(model)
    device = next(parameter.device for parameter in model.parameters() if parameter.requires_grad)
    return LoadedModel(model=model, backend="unsloth", layout="unsloth", autocast_dtype=dtype, device=device)


def _keeps_tie(model: torch.nn.Module, modules_to_save: list[str]) -> bool:
    """Return whether peft should train one matrix for a tied `embed_tokens` and `lm_head`.

    Without `ensure_weight_tying`, peft 0.21.2 gives each entry of `modules_to_save` its own copy,
    so the two tied weights train apart and the adapter no longer describes a tied model. With it,
    peft keeps the `embed_tokens` copy and makes `lm_head` use that same parameter. This is the
    rule Unsloth 2026.10.9 applies by default: the model ties its embeddings and both are trained.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return tied and {"embed_tokens", "lm_head"} <= {name.rsplit(".", 1)[-1] for name in modules_to_save}


def _upcast_trainable(model: torch.nn.Module) -> None:
    """Cast every trainable weight to fp32 in place, so it is an fp32 master copy under bf16 autocast.

    Assigning `.data` keeps each `Parameter` object, so a weight shared by `embed_tokens` and
    `lm_head` stays one parameter. `parameters()` yields a shared weight once.
    """
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


@contextlib.contextmanager
def _relative_name_or_path(model: torch.nn.Module) -> Iterator[None]:
    """Give `model.config._name_or_path` the model directory's name alone while Unsloth adds the adapters.

    Unsloth 2026.10.9 writes its disk-offloaded embeddings to
    `os.path.join(temporary_location, config._name_or_path)`, and an absolute `_name_or_path`
    (a local model directory) replaces `temporary_location`, so the files would land inside the
    base model's directory. peft records the base model from `model.name_or_path`, a separate
    attribute, so the adapter config still names the full path.
    """
    original = model.config._name_or_path
    model.config._name_or_path = Path(original).name or "model"
    try:
        yield
    finally:
        model.config._name_or_path = original


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
