"""Tiny Qwen2-architecture models and tokenizers for the CPU demo and the tests.

`build_tiny_model` writes a randomly initialized `Qwen2ForCausalLM` sized to a tokenizer's
vocabulary: hidden 64 and 2 layers by default, about 75k weights besides the embeddings. The
tokenizer files are copied byte for byte beside it, so `cptstream shard` and `cptstream train`
compute the same tokenizer.json sha256. `train_tiny_tokenizer` makes a byte-level BPE tokenizer from text,
so the demo runs without a model hub. Byte-level BPE covers every UTF-8 string, CJK included.

Command line:
    python -m cptstream.tiny_model --tokenizer DIR --output DIR
    python -m cptstream.tiny_model --train-tokenizer-on corpus.txt --output DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from cptstream.tokenizer_files import copy_tokenizer_files

__all__ = ["build_tiny_model", "tiny_qwen2_config", "train_tiny_tokenizer"]

logger = logging.getLogger("cptstream")

EOS_TOKEN = "<|endoftext|>"

def tiny_qwen2_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, eos_id: int | None = None):
    """Return a `transformers.Qwen2Config` for a tiny model with untied embeddings (as Qwen2.5-7B).

    Args:
        vocab_size: embedding rows.
        hidden_size: model width; 4 query heads and 2 key/value heads share it. Default: ``64``.
        num_layers: decoder layers. Default: ``2``.
        eos_id: EOS and BOS id written into the config. Default: None.
    """
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )


def build_tiny_model(
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    pad_vocab_to_multiple_of: int = 64,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2 model for the tokenizer in `tokenizer_dir`, with its tokenizer files.

    Args:
        tokenizer_dir: directory with tokenizer.json (and usually tokenizer_config.json).
        output_dir: model directory to write.
        hidden_size: model width. Default: ``64``.
        num_layers: decoder layers. Default: ``2``.
        pad_vocab_to_multiple_of: round the embedding rows up, as Qwen2.5 does (151,646 tokens,
            152,064 rows), so the checks see more rows than tokens. Default: ``64``.
        seed: seed of the random weights. Default: ``0``.

    Returns:
        `output_dir`.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen2ForCausalLM

    tokenizer_dir, output_dir = Path(tokenizer_dir), Path(output_dir)
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found: --tokenizer must be a directory with a tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    rows = -(-tokens // pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of

    config = tiny_qwen2_config(
        rows, hidden_size=hidden_size, num_layers=num_layers, eos_id=_eos_id(tokenizer_dir, tokenizer)
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    copy_tokenizer_files(output_dir, tokenizer_dir)
    logger.info(
        "wrote a %d-layer, width-%d Qwen2 model with %d embedding rows to %s", num_layers, hidden_size, rows, output_dir
    )
    return output_dir


def _eos_id(tokenizer_dir: Path, tokenizer) -> int | None:
    config_file = tokenizer_dir / "tokenizer_config.json"
    eos = None
    if config_file.is_file():
        eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return tokenizer.token_to_id(eos or EOS_TOKEN)


def train_tiny_tokenizer(texts: Iterable[str], output_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it as a transformers tokenizer directory.

    The EOS token is `<|endoftext|>` (Qwen's), and it doubles as the pad token.

    Returns:
        `output_dir`, containing tokenizer.json and tokenizer_config.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    output_dir = Path(output_dir)
    wrapped.save_pretrained(str(output_dir))
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """Build a tiny model directory from the command line."""
    parser = argparse.ArgumentParser(prog="python -m cptstream.tiny_model", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", type=Path, help="directory with the tokenizer.json to size the model for")
    source.add_argument(
        "--train-tokenizer-on",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="UTF-8 text files to train a BPE tokenizer on",
    )
    parser.add_argument("--output", type=Path, required=True, help="model directory to write")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size with --train-tokenizer-on")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tokenizer_dir = args.tokenizer
    if args.train_tokenizer_on:
        texts = [path.read_text(encoding="utf-8") for path in args.train_tokenizer_on]
        tokenizer_dir = train_tiny_tokenizer(texts, args.output / "_tokenizer", vocab_size=args.vocab_size)
    build_tiny_model(tokenizer_dir, args.output, hidden_size=args.hidden_size, num_layers=args.layers)
    if args.train_tokenizer_on:
        shutil.rmtree(tokenizer_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
