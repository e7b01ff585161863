"""Build the Qwen2 and Llama-3 tokenizers and check them against llama.cpp's reference vectors.

Qwen2: the BPE ranks in `qwen.tiktoken` (shipped in the dashscope wheel) are Qwen's vocabulary of
151,643 byte-level tokens. transformers' TikTokenConverter turns the ranks into a vocab and merges,
and the rest of the pipeline is set to match Qwen2's published tokenizer.json (NFC, regex split,
byte-level, no BOS). Llama-3: vocab and merges come from llama.cpp's vocab-only
`ggml-vocab-llama-bpe.gguf`, with the post-processor that prepends `<|begin_of_text|>`.

Reference vectors: llama.cpp's `models/ggml-vocab-*.gguf.inp` contains test strings, each followed by a
`__ggml_vocab_test__` line, and the matching `.out` contains one line of space-separated ids per string,
produced by the models' own Hugging Face tokenizers. A build is published only if every id matches.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = [
    "LLAMA3_BOS",
    "LLAMA3_EOS",
    "QWEN2_SPECIAL_TOKENS",
    "build_llama3",
    "build_qwen2",
    "check_reference_vectors",
    "read_reference_vectors",
]

logger = logging.getLogger("fetch_assets")

# Qwen2's pre-tokenizer split: one digit per piece, unlike cl100k and Llama-3, which take up to three.
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_VOCAB_SIZE = 151643
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

LLAMA3_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_BOS = ("<|begin_of_text|>", 128000)
LLAMA3_EOS = ("<|end_of_text|>", 128001)
LLAMA3_VOCAB_SIZE = 128256
# llama.cpp token type for control tokens (gguf TokenType.CONTROL).
GGUF_TOKEN_TYPE_CONTROL = 3

TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


def read_reference_vectors(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """Parse a llama.cpp `.inp`/`.out` pair into (text, expected ids) cases."""
    # Bytes are decoded directly because text-mode reading would turn "\r\n" in test strings into "\n".
    texts = inp.read_bytes().decode("utf-8").split(TEST_SEPARATOR)
    if texts[-1] != "":
        raise ValueError(f"{inp} does not end with a {TEST_SEPARATOR.strip()} line")
    texts.pop()

    lines = out.read_bytes().decode("utf-8").split("\n")
    if lines[-1] != "":
        raise ValueError(f"{out} does not end with a newline")
    lines.pop()

    if len(texts) != len(lines):
        raise ValueError(f"{inp} has {len(texts)} test strings but {out} has {len(lines)} id lines")
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(texts, lines)]


def check_reference_vectors(tokenizer: Tokenizer, cases: list[tuple[str, list[int]]], label: str) -> None:
    """Raise ValueError listing every case whose ids differ from the reference ids."""
    mismatches = []
    for text, expected in cases:
        actual = tokenizer.encode(text, add_special_tokens=False).ids
        if actual != expected:
            mismatches.append(f"  {text[:60]!r}: got {actual[:16]}, expected {expected[:16]}")
    if mismatches:
        raise ValueError(
            f"{label}: {len(mismatches)} of {len(cases)} reference strings encode differently:\n"
            + "\n".join(mismatches)
        )
    logger.info("%s: all %d reference strings match", label, len(cases))


# ---- Qwen2 ----


def build_qwen2(tiktoken_file: Path) -> Tokenizer:
    """Convert Qwen's tiktoken BPE ranks into a Hugging Face tokenizer laid out as Qwen2's."""
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as err:
        raise RuntimeError(
            "transformers is required to convert qwen.tiktoken; install the project's dependencies"
        ) from err

    # The converter reads the ranks with tiktoken.load and derives each token's merge from the ranks
    # of its two halves, so ranks order the merges as they order tiktoken's own BPE.
    converter = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN2_SPLIT_REGEX)
    vocab, merges = converter.extract_vocab_merges_from_model(str(tiktoken_file))
    if len(vocab) != QWEN2_VOCAB_SIZE:
        raise ValueError(f"{tiktoken_file} has {len(vocab)} tokens, expected Qwen's {QWEN2_VOCAB_SIZE}")

    # Model options as in Qwen2's tokenizer.json. ignore_merges stays off there, unlike Llama-3.
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    # The byte-level post-processor only fixes offsets, because Qwen2 adds no BOS or EOS when encoding.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    # Added in id order, so each one takes the next free id after the 151,643 BPE tokens.
    for content, expected_id in QWEN2_SPECIAL_TOKENS.items():
        tokenizer.add_special_tokens([AddedToken(content, normalized=False, special=True)])
        if tokenizer.token_to_id(content) != expected_id:
            raise AssertionError(f"{content} got id {tokenizer.token_to_id(content)}, expected {expected_id}")
    return tokenizer


def qwen2_tokenizer_config() -> dict:
    """Return the tokenizer_config.json of Qwen2 base models: EOS and padding are <|endoftext|>, no BOS."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for content, token_id in QWEN2_SPECIAL_TOKENS.items()
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---- Llama-3 ----


def _read_gguf_vocab(gguf_file: Path, gguf_py_dir: Path) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """Read tokens, token types and merges from a vocab-only GGUF with llama.cpp's gguf-py reader."""
    sys.path.insert(0, str(gguf_py_dir))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(gguf_py_dir))

    # NOTE: GGUFReader indexes every array element on open, which takes about 25 s for this file.
    reader = GGUFReader(str(gguf_file))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens = strings("tokenizer.ggml.tokens")
    type_field = reader.fields["tokenizer.ggml.token_type"]
    token_types = [int(type_field.parts[i][0]) for i in type_field.data]
    merges = [tuple(line.split(" ")) for line in strings("tokenizer.ggml.merges")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{gguf_file}: {len(bad)} merges are not two space-separated tokens, e.g. {bad[0]}")
    return tokens, token_types, merges


def build_llama3(gguf_file: Path, gguf_py_dir: Path) -> Tokenizer:
    """Build Meta Llama-3's tokenizer from llama.cpp's ggml-vocab-llama-bpe.gguf."""
    tokens, token_types, merges = _read_gguf_vocab(gguf_file, gguf_py_dir)
    if len(tokens) != LLAMA3_VOCAB_SIZE:
        raise ValueError(f"{gguf_file} has {len(tokens)} tokens, expected Llama-3's {LLAMA3_VOCAB_SIZE}")

    # Llama-3 looks a whole pre-token up in the vocab before applying merges (ignore_merges), as tiktoken does.
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()

    # The 256 control tokens (<|begin_of_text|>, <|reserved_special_token_N|>, ...) keep their vocab ids.
    control = [tok for tok, kind in zip(tokens, token_types) if kind == GGUF_TOKEN_TYPE_CONTROL]
    tokenizer.add_special_tokens([AddedToken(tok, normalized=False, special=True) for tok in control])

    bos, bos_id = LLAMA3_BOS
    for content, expected_id in (LLAMA3_BOS, LLAMA3_EOS):
        if tokenizer.token_to_id(content) != expected_id:
            raise ValueError(f"{gguf_file}: {content} has id {tokenizer.token_to_id(content)}, expected {expected_id}")

    # Llama-3 prepends BOS to every sequence and appends no EOS. Training code adds EOS between documents.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return tokenizer


def llama3_tokenizer_config() -> dict:
    """Return a tokenizer_config.json for Meta-Llama-3-8B: BOS <|begin_of_text|>, EOS <|end_of_text|>."""
    return {
        "bos_token": LLAMA3_BOS[0],
        "clean_up_tokenization_spaces": True,
        "eos_token": LLAMA3_EOS[0],
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_dir(directory: Path, tokenizer: Tokenizer, config: dict) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
