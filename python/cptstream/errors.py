"""Exceptions raised by cptstream; the Rust core raises the same classes."""

from cptstream._core import CptstreamError, ShardFormatError, TokenizerError

__all__ = ["CptstreamError", "ShardFormatError", "TokenizerError"]
