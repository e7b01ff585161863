"""The tokenizer files that travel with a model directory, and copying them beside a saved model."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(destination: Path, *sources: Path) -> None:
    """Copy each tokenizer file into `destination` from the first source directory that has it."""
    for name in TOKENIZER_FILES:
        for source in sources:
            if (source / name).is_file():
                shutil.copy2(source / name, destination / name)
                break
