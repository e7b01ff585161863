"""Tests of the training side on CPU: attention isolation, loss averaging, checks, resume, export.

Models are tiny Qwen2s (hidden 64, 2 layers) built from a BPE tokenizer trained here, and shards
are written with pyarrow by `write_shards` from test_data.py, following docs/shard-format.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from test_data import write_shards

from cptstream.lock import DirLock
from cptstream.tiny_model import build_tiny_model, tiny_qwen2_config, train_tiny_tokenizer
from cptstream.train.batch import collate_rows, count_targets, model_inputs
from cptstream.train.cli import add_export_parser, add_train_parser
from cptstream.train.config import load_config
from cptstream.train.lora import load_model, param_groups

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"
PYTHON_DIR = Path(__file__).resolve().parent.parent / "python"
SEQ_LEN = 32
TEXTS = [
    "Continued pretraining adapts a language model to a domain corpus. " * 3,
    "Le modèle apprend le vocabulaire du domaine à partir de documents bruts. " * 3,
    "继续预训练让语言模型适应领域语料。模型从原始文档中学习领域词汇。" * 3,
    "東京の研究所で新しい言語モデルを訓練した。日本語の文書も正しく扱う。" * 3,
    "Packed rows hold several documents, and no document may attend to another. " * 3,
]
ENVIRONMENT = ("HF_HUB_OFFLINE", "UNSLOTH_DISABLE_STATISTICS", "UNSLOTH_COMPILE_LOCATION")


# ---- fixtures ----


def tiny_model_forward(vocab_size: int, attn: str) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size)
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config).eval()


def packed_forward(model: torch.nn.Module, rows: list[list[int]], lengths: list[list[int]], mask_dtype) -> torch.Tensor:
    batch = collate_rows(np.array(rows, dtype=np.int32), [np.array(row) for row in lengths])
    inputs = model_inputs(batch, "mask", torch.device("cpu"), mask_dtype)
    inputs.pop("labels")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(autouse=True)
def restore_environment(monkeypatch):
    """Start each test without the variables `cptstream train` sets, and restore them afterwards."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def save_tiny_model(directory: Path, *, vocab_size: int = 120, tied: bool) -> Path:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size)
    config.tie_word_embeddings = tied
    Qwen2ForCausalLM(config).save_pretrained(str(directory))
    return directory


def lora_run_config(model_dir: Path, output: Path):
    overrides = {"model.path": str(model_dir), "train.output": str(output), "model.max_seq_length": SEQ_LEN}
    return load_config(CONFIG, overrides)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Two tokenizers with the same vocabulary size but different merges."""
    root = tmp_path_factory.mktemp("tokenizers")
    first = train_tiny_tokenizer(TEXTS, root / "first", vocab_size=300)
    second = train_tiny_tokenizer(list(reversed(TEXTS)) + ["zzz qqq xxx"] * 5, root / "second", vocab_size=300)
    return first, second


def tokenizer_record(tokenizer_dir: Path) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    return {
        "path": str(tokenizer_dir),
        "sha256": hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest(),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_token": "<|endoftext|>",
        "eos_id": eos_id,
        "bos_token": None,
        "bos_id": None,
        "pad_id": eos_id,
    }


def make_shards(root: Path, tokenizer_dir: Path, *, documents: int = 48) -> Path:
    """Tokenize varied sentences, pack them greedily into rows of SEQ_LEN, and write 3 train shards + validation."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    record = tokenizer_record(tokenizer_dir)
    rng = np.random.default_rng(0)
    rows, tokens, lengths = [], [], []
    for index in range(documents):
        text = TEXTS[index % len(TEXTS)][: int(rng.integers(10, 60))]
        ids = tokenizer.encode(text).ids[: SEQ_LEN - 1] + [record["eos_id"]]
        if len(tokens) + len(ids) > SEQ_LEN:
            rows.append((tokens, lengths))
            tokens, lengths = [], []
        tokens, lengths = tokens + ids, lengths + [len(ids)]
    rows.append((tokens, lengths))
    shards = [rows[i::3] for i in range(3)]
    return write_shards(
        root,
        shards[:2] + [shards[2][2:]],
        seq_len=SEQ_LEN,
        rows_per_batch=3,
        pad_id=record["pad_id"],
        tokenizer=record,
        validation=[shards[2][:2]],
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer_dirs):
    root = tmp_path_factory.mktemp("train")
    model = build_tiny_model(tokenizer_dirs[0], root / "model")
    data = make_shards(root / "shards", tokenizer_dirs[0])
    return root, model, data


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(required=True)
    add_train_parser(subparsers)
    add_export_parser(subparsers)
    args = parser.parse_args(list(argv))
    return args.func(args)


def train_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(CONFIG),
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(output),
        "--max-steps",
        "6",
        "--set",
        "data.num_workers=1",
        "--set",
        "data.micro_batch_size=2",
        "--set",
        "lora.dropout=0.1",
        "--set",
        "checkpoint.every=2",
        "--set",
        "log.eval_every=3",
        "--set",
        f"model.max_seq_length={SEQ_LEN}",
        *extra,
    ]


def read_metrics(output: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record[key] for record in records if key in record}


# ---- attention isolation and loss ----


@pytest.mark.parametrize(("attn", "mask_dtype"), [("sdpa", torch.bool), ("eager", torch.float32)])
def test_packed_copy_matches_alone(attn, mask_dtype):
    eos, vocab = 1, 50
    model = tiny_model_forward(vocab, attn)
    document = [7, 8, 9, 10, eos]
    packed = packed_forward(model, [document + document], [[5, 5]], mask_dtype)
    alone = packed_forward(model, [document], [[5]], mask_dtype)

    batch = collate_rows(np.array([document + document], dtype=np.int32), [np.array([5, 5])])
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert torch.allclose(packed[0, 5:], alone[0], atol=1e-4)

    random_first = torch.randint(2, vocab, (4,), generator=torch.Generator().manual_seed(1)).tolist() + [eos]
    changed = packed_forward(model, [random_first + document], [[5, 5]], mask_dtype)
    assert random_first != document
    assert torch.allclose(changed[0, 5:], packed[0, 5:], atol=1e-6)


def test_loss_averages_over_nine_targets():
    eos = 1
    tokens = [5, 6, 7, eos, 8, 9, eos, 10, 11, 12, 13, eos]
    batch = collate_rows(np.array([tokens], dtype=np.int32), [np.array([4, 3, 5])])
    model = tiny_model_forward(20, "sdpa")
    inputs = model_inputs(batch, "mask", torch.device("cpu"))
    targets = count_targets(batch["labels"])

    with torch.no_grad():
        output = model(**inputs, num_items_in_batch=targets)
    log_probs = torch.log_softmax(output.logits[0, :-1].float(), dim=-1)
    next_tokens = torch.tensor(tokens[1:])
    trained = [i for i in range(11) if i + 1 not in (4, 7)]
    expected = -log_probs[trained, next_tokens[trained]].mean()

    assert targets == 9
    assert len(trained) == 9
    assert torch.allclose(output.loss, expected, atol=1e-6)


def test_unsloth_lengths_stay_on_cpu():
    batch = collate_rows(np.array([[5, 6, 7, 1, 8, 9, 1, 0]], dtype=np.int32), [np.array([4, 3])])
    inputs = model_inputs(batch, "unsloth", torch.device("meta"))

    assert inputs["input_ids"].device.type == "meta"
    assert inputs["labels"].device.type == "meta"
    assert inputs["position_ids"].device.type == "meta"
    assert inputs["packed_seq_lengths"].device.type == "cpu"
    assert inputs["packed_seq_lengths"].tolist() == [4, 3]


# ---- model setup ----


def test_tied_embeddings_train_one_matrix(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "tied", tied=True)
    loaded = load_model(lora_run_config(model_dir, tmp_path / "run"), "hf", torch.float32)
    model = loaded.model
    embedding = model.get_input_embeddings().modules_to_save.default.weight
    head = model.get_output_embeddings().modules_to_save.default.weight
    assert embedding is head
    before = embedding.detach().clone()

    groups = param_groups(model, 1e-2, 1e-2, 0.0)
    assert [group["name"] for group in groups] == ["lora", "embeddings"]
    assert len(groups[1]["params"]) == 1
    optimizer = torch.optim.AdamW(groups)
    tokens = torch.tensor([[5, 17, 42, 99, 3, 7, 64, 11]])
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()

    assert not torch.equal(embedding, before)
    assert model.get_output_embeddings().modules_to_save.default.weight is embedding
    assert torch.equal(model.get_output_embeddings().modules_to_save.default.weight, embedding)

    # The saved adapter rebuilds the tie on load and gives the trained model's logits.
    model.save_pretrained(str(tmp_path / "adapter"))
    model.eval()
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir)), str(tmp_path / "adapter")
    )
    reloaded.eval()
    reloaded_embedding = reloaded.get_input_embeddings().modules_to_save.default.weight
    assert reloaded.get_output_embeddings().modules_to_save.default.weight is reloaded_embedding
    assert torch.equal(reloaded_embedding, embedding)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_untied_embeddings_train_two_matrices(tmp_path):
    model_dir = save_tiny_model(tmp_path / "untied", tied=False)
    loaded = load_model(lora_run_config(model_dir, tmp_path / "run"), "hf", torch.float32)
    embedding = loaded.model.get_input_embeddings().modules_to_save.default.weight
    head = loaded.model.get_output_embeddings().modules_to_save.default.weight

    assert embedding is not head
    assert embedding.requires_grad
    assert head.requires_grad


class StandInUnsloth:
    """Stand-in for `unsloth.FastLanguageModel` on CPU: records the calls, adds adapters with peft.

    It keeps the `modules_to_save` copies in bf16 and the LoRA weights in fp32, as Unsloth
    2026.10.9 does for a bf16 model.
    """

    calls: ClassVar[dict] = {}

    @staticmethod
    def from_pretrained(**kwargs):
        from transformers import AutoModelForCausalLM

        StandInUnsloth.calls["from_pretrained"] = kwargs
        return AutoModelForCausalLM.from_pretrained(kwargs["model_name"], dtype=kwargs["dtype"]), None

    @staticmethod
    def get_peft_model(model, **kwargs):
        from peft import LoraConfig, get_peft_model

        StandInUnsloth.calls["get_peft_model"] = {**kwargs, "_name_or_path": model.config._name_or_path}
        config = LoraConfig(
            r=kwargs["r"],
            lora_alpha=kwargs["lora_alpha"],
            target_modules=kwargs["target_modules"],
            modules_to_save=kwargs["modules_to_save"],
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    @staticmethod
    def for_training(model):
        model.train()


def test_unsloth_setup_arguments_and_fp32(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model", tied=False)
    output = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=StandInUnsloth))
    StandInUnsloth.calls.clear()

    loaded = load_model(lora_run_config(model_dir, output), "unsloth", torch.bfloat16)

    loading = StandInUnsloth.calls["from_pretrained"]
    assert loading["trust_remote_code"] is False
    adapters = StandInUnsloth.calls["get_peft_model"]
    assert adapters["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert "embed_tokens" not in adapters["target_modules"]
    assert "lm_head" not in adapters["target_modules"]
    assert adapters["temporary_location"] == str(output.resolve() / ".cptstream" / "unsloth" / "buffers")
    assert adapters["_name_or_path"] == "model"
    assert loaded.model.get_base_model().config._name_or_path == str(model_dir.resolve())

    trainable = {name: parameter for name, parameter in loaded.model.named_parameters() if parameter.requires_grad}
    assert any(".modules_to_save." in name for name in trainable)
    assert {str(parameter.dtype) for parameter in trainable.values()} == {"torch.float32"}
    assert loaded.layout == "unsloth"
    assert loaded.autocast_dtype == torch.bfloat16


# ---- checks before step 1 ----


def test_tokenizer_mismatch_stops_before_training(tmp_path, workspace, tokenizer_dirs, caplog):
    _, _, data = workspace
    other_model = build_tiny_model(tokenizer_dirs[1], tmp_path / "other-model")
    first_vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    second_record = tokenizer_record(tokenizer_dirs[1])
    assert second_record["vocab_size"] == first_vocab

    output = tmp_path / "run"
    assert run_cli(*train_args(other_model, data, output)) == 2

    message = caplog.text
    assert str(tokenizer_dirs[0]) in message
    assert str(other_model / "tokenizer.json") in message
    assert tokenizer_record(tokenizer_dirs[0])["sha256"] in message
    assert second_record["sha256"] in message
    assert not (output / "metrics.jsonl").exists()


def test_token_id_beyond_embeddings_rejected(tmp_path, workspace, tokenizer_dirs, caplog):
    _, model, _ = workspace
    record = tokenizer_record(tokenizer_dirs[0])
    rows_of_model = json.loads((model / "config.json").read_text())["vocab_size"]
    data = write_shards(
        tmp_path / "data", [[([3, 4, rows_of_model, record["eos_id"]], [4])] * 4], seq_len=SEQ_LEN, tokenizer=record
    )

    assert run_cli(*train_args(model, data, tmp_path / "run")) == 2
    assert f"contain token ids 0..{rows_of_model}" in caplog.text
    assert f"{rows_of_model} embedding rows" in caplog.text


def test_seq_len_mismatch_rejected(tmp_path, workspace, caplog):
    _, model, data = workspace
    args = train_args(model, data, tmp_path / "run", "--set", "model.max_seq_length=64")
    assert run_cli(*args) == 2
    assert f"model.max_seq_length is 64 but the shards in {data} have seq_len {SEQ_LEN}" in caplog.text


def test_train_sets_offline_environment(tmp_path, workspace, monkeypatch):
    _, model, data = workspace
    output = tmp_path / "run"
    monkeypatch.setenv("UNSLOTH_DISABLE_STATISTICS", "0")

    # A run that stops at the seq_len check still sets the variables, before any model code loads.
    assert run_cli(*train_args(model, data, output, "--set", "model.max_seq_length=64")) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["UNSLOTH_DISABLE_STATISTICS"] == "0"
    assert os.environ["UNSLOTH_COMPILE_LOCATION"] == str(output.resolve() / ".cptstream" / "unsloth" / "compiled")


def test_locked_output_names_holder(tmp_path, workspace, caplog):
    _, model, data = workspace
    output = tmp_path / "run"
    with DirLock(output):
        assert run_cli(*train_args(model, data, output)) == 2
    assert f"in use by process {os.getpid()}" in caplog.text


# ---- training, resume, adapter and export ----


def test_resume_matches_uninterrupted_and_exports(tmp_path, workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, model_dir, data = workspace
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"

    assert run_cli(*train_args(model_dir, data, straight)) == 0
    assert run_cli(*train_args(model_dir, data, interrupted, "--stop-after", "3")) == 0
    assert not (interrupted / "adapter").exists()
    assert run_cli(*train_args(model_dir, data, interrupted, "--resume")) == 0

    losses = read_metrics(straight, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert read_metrics(interrupted, "train/loss") == losses
    assert read_metrics(interrupted, "eval/ppl") == read_metrics(straight, "eval/ppl")
    assert sorted(read_metrics(straight, "eval/ppl")) == [0, 3, 6]
    checkpoints = sorted(path.name for path in (straight / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000006"]

    # The adapter loads back with peft and reproduces the trained model's logits.
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250]])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    adapted = PeftModel.from_pretrained(base, str(straight / "adapter")).eval()
    resumed = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir)), str(interrupted / "adapter")
    )
    with torch.no_grad():
        adapter_logits = adapted(input_ids=tokens).logits
        assert torch.equal(adapter_logits, resumed.eval()(input_ids=tokens).logits)
        assert not torch.allclose(
            adapter_logits, AutoModelForCausalLM.from_pretrained(str(model_dir))(input_ids=tokens).logits
        )

    # The merged export is a plain transformers model with the same logits.
    merged_dir = tmp_path / "merged"
    assert run_cli("export", str(straight / "adapter"), "--merge", "--output", str(merged_dir)) == 0
    assert (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=tokens).logits, adapter_logits, atol=1e-4)


def test_tokenizer_keeps_cjk(tokenizer_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs[0]))
    text = "继续预训练 東京の研究所 modèle"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_sigterm_checkpoints_then_resumes(tmp_path, workspace):
    _, model_dir, data = workspace
    output = tmp_path / "run"
    args = train_args(model_dir, data, output)
    args[args.index("--max-steps") + 1] = "400"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "cptstream.train.cli", *args, "--set", "checkpoint.every=1000"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # Wait for two logged steps, so the signal arrives in the middle of training.
    deadline = time.monotonic() + 120
    metrics = output / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    last_step = max(read_metrics(output, "train/loss"))
    assert last_step < 400
    assert (output / "checkpoints" / f"step_{last_step:08d}" / "trainer_state.json").is_file()
    assert "received SIGTERM" in stderr

    resumed = run_cli(*args, "--resume", "--stop-after", str(last_step + 1))
    assert resumed == 0
    assert max(read_metrics(output, "train/loss")) == last_step + 1


@pytest.fixture
def restore_root_logging():
    """Put back the root logger's handlers and level, which the main CLI's init_logging replaces."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.slow
def test_real_shards_train_and_export(tmp_path, tokenizer_dirs, restore_root_logging):
    from cptstream.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(40):
        text = TEXTS[index % len(TEXTS)] + f" 第{index}篇文档 document {index}."
        (corpus / f"doc_{index:02d}.txt").write_text(text, encoding="utf-8")
    model_dir = build_tiny_model(tokenizer_dirs[0], tmp_path / "model")
    shards, output, merged = tmp_path / "shards", tmp_path / "run", tmp_path / "merged"

    shard_args = ["shard", str(corpus), "--tokenizer", str(model_dir), "--seq-len", "64", "--val-fraction", "0.2"]
    assert main([*shard_args, "--output", str(shards), "--no-progress"]) == 0
    train = [
        "train",
        "--config",
        str(CONFIG),
        "--model",
        str(model_dir),
        "--data",
        str(shards),
        "--output",
        str(output),
    ]
    assert main([*train, "--set", "model.max_seq_length=64"]) == 0
    assert main(["export", str(output / "adapter"), "--merge", "--output", str(merged)]) == 0

    assert (merged / "model.safetensors").is_file()
    assert read_metrics(output, "eval/ppl")
