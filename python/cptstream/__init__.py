"""cptstream: continued pretraining on corpora bigger than memory.

`cptstream shard` turns raw corpora into packed Arrow shards in one Rust pass; `cptstream train`
streams those shards into a LoRA training loop.
"""

from cptstream._core import FORMAT_VERSION, __version__
from cptstream.errors import CptstreamError, ShardFormatError, TokenizerError

__all__ = ["FORMAT_VERSION", "CptstreamError", "ShardFormatError", "TokenizerError", "__version__"]
