"""Training batches from packed rows: labels, position ids and the attention layout.

One row contains several document pieces back to back. Each piece is its own sequence: position ids
restart at 0, a token attends only to earlier tokens of its piece, and no token is trained to
predict the first token of the next piece. There are two layouts for the attention:

- padded `[B, T]` rows with a block-diagonal causal mask `[B, 1, T, T]` (bool for SDPA, additive
  float for eager attention), which costs `B * T^2` bytes as bool (16 MiB per row at T=4096)
  and forces SDPA off its flash kernel, so it is meant for CPU runs and tests;
- a flat `[1, N]` layout of the real tokens only, with position ids and per-piece lengths, for
  the varlen kernels of flash attention and of Unsloth's padding-free packing.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "block_causal_mask",
    "collate_rows",
    "count_targets",
    "expand_rows",
    "model_inputs",
    "pack_rows",
    "to_packed_layout",
]

IGNORE_INDEX = -100


def collate_rows(input_ids: np.ndarray, seq_lengths: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Build a training batch from packed rows: `expand_rows(pack_rows(input_ids, seq_lengths))`.

    Position ids restart at 0 for every document piece and for the padding tail. Labels equal the
    input ids except -100 on the padding tail (found from the lengths, never from the pad id) and on
    the first token of every piece after the first, because transformers shifts labels inside the
    model: label `i` is predicted from position `i - 1`, which belongs to the previous piece.

    Args:
        input_ids: int `[rows, seq_len]`, values within int32 (the shard format stores int32).
        seq_lengths: per row, the lengths of its document pieces in order.

    Returns:
        `input_ids`, `labels`, `position_ids` (int64 `[rows, seq_len]`), `seq_lengths` (int32
        `[rows, max_pieces]`, zero-filled), and `num_tokens` (int64 `[rows]`, real tokens per row).
    """
    return expand_rows(pack_rows(input_ids, seq_lengths))


def pack_rows(input_ids: np.ndarray, seq_lengths: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Check packed rows and return the compact form that DataLoader workers send to the main process.

    Every tensor a worker yields is moved into its own shared-memory segment, and that hand-over,
    not building the batch, limits a DataLoader with workers. So a worker sends two int32 tensors,
    a sixth of the bytes of the full batch, and `expand_rows` derives the rest in the main process.

    Args:
        input_ids: int `[rows, seq_len]`, values within int32.
        seq_lengths: per row, the lengths of its document pieces in order.

    Returns:
        `input_ids` (int32 `[rows, seq_len]`) and `seq_lengths` (int32 `[rows, max_pieces]`, zero-filled).

    Raises:
        ValueError: a row's lengths are not positive or add up to more than `seq_len`, or an id
            does not fit int32.
    """
    rows, seq_len = input_ids.shape
    if input_ids.dtype != np.int32 and input_ids.size:
        info = np.iinfo(np.int32)
        if input_ids.min() < info.min or input_ids.max() > info.max:
            raise ValueError(f"input ids must fit int32, got values in [{input_ids.min()}, {input_ids.max()}]")
    padded_lengths = np.zeros((rows, max(1, max(len(lengths) for lengths in seq_lengths))), dtype=np.int32)
    for row, lengths in enumerate(seq_lengths):
        lengths = lengths.astype(np.int64)
        if lengths.sum() > seq_len or (lengths.size and lengths.min() <= 0):
            raise ValueError(f"seq_lengths {lengths.tolist()} are invalid for a row of {seq_len} tokens")
        padded_lengths[row, : lengths.size] = lengths
    return {
        # astype copies, so the tensor never aliases a decoded record batch that a worker's cache still holds.
        "input_ids": torch.from_numpy(input_ids.astype(np.int32)),
        "seq_lengths": torch.from_numpy(padded_lengths),
    }


def expand_rows(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build the training batch of `collate_rows` from the output of `pack_rows`.

    Vectorized over the whole batch, because it runs in the training process on every micro-batch.

    Args:
        packed: `input_ids` (int `[rows, seq_len]`) and `seq_lengths` (int `[rows, max_pieces]`,
            zero-filled, valid as `pack_rows` checks).

    Returns:
        The keys, dtypes and values that `collate_rows` documents.
    """
    input_ids = packed["input_ids"].to(torch.int64)
    lengths = packed["seq_lengths"].to(torch.int64)
    rows, seq_len = input_ids.shape
    num_tokens = lengths.sum(dim=1)
    # Piece starts; the zero-length fillers start at the row's real length, where the padding tail
    # begins. The tail is one more piece for the position ids, so every row gets a start there too.
    starts = torch.cumsum(lengths, dim=1) - lengths
    starts = torch.cat([starts, num_tokens[:, None]], dim=1)
    in_row = starts < seq_len
    row_index = torch.arange(rows)[:, None].expand_as(starts)

    # Position ids: distance to the latest piece start. Starts increase along a row, so a running
    # maximum of the start values written at their own positions gives each token its piece start.
    marker = torch.zeros((rows, seq_len), dtype=torch.int64)
    marker[row_index[in_row], starts[in_row]] = starts[in_row]
    position_ids = torch.arange(seq_len) - torch.cummax(marker, dim=1).values

    labels = input_ids.clone()
    later = in_row.clone()
    later[:, 0] = False
    labels[row_index[later], starts[later]] = IGNORE_INDEX
    labels[torch.arange(seq_len)[None, :] >= num_tokens[:, None]] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "seq_lengths": packed["seq_lengths"].to(torch.int32),
        "num_tokens": num_tokens,
    }


def count_targets(labels: torch.Tensor) -> int:
    """Return how many tokens the loss averages over: labels after transformers' shift that are not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def block_causal_mask(seq_lengths: torch.Tensor, seq_len: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Build the `[B, 1, T, T]` mask that lets a token attend only to earlier tokens of its piece.

    The padding tail after the last piece forms one more piece, so every query row keeps at least
    itself and softmax never sees a fully masked row.

    Args:
        seq_lengths: int `[B, max_pieces]` piece lengths, zero-filled (the `seq_lengths` batch entry).
        seq_len: T.
        dtype: `torch.bool` (True where attention is allowed, for SDPA), or a float dtype for an
            additive mask (0 where allowed, `finfo(dtype).min` elsewhere, for eager attention).
    """
    rows = seq_lengths.shape[0]
    segment = torch.empty((rows, seq_len), dtype=torch.long)
    for row in range(rows):
        lengths = seq_lengths[row][seq_lengths[row] > 0].long()
        pieces = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        segment[row, : pieces.numel()] = pieces
        segment[row, pieces.numel() :] = lengths.numel()
    same_piece = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = (same_piece & causal)[:, None]
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def to_packed_layout(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten a padded batch into one `[1, N]` row of its real tokens, for varlen attention kernels.

    Padding is dropped, so N is the batch's real token count. Every piece start gets label -100,
    so no target crosses a piece or a row boundary, and the target count equals the padded layout's.

    Returns:
        `input_ids`, `labels`, `position_ids` `[1, N]` and `packed_seq_lengths` (int32, one entry
        per piece, the name Unsloth's packed forward reads).
    """
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, count in enumerate(batch["num_tokens"].tolist()):
        keep[row, :count] = True
    lengths = batch["seq_lengths"][batch["seq_lengths"] > 0].to(torch.int32)

    # The first piece of each row has no masked label of its own (the per-row shift drops it), but
    # once rows are joined it would be predicted from the previous row, so mask every piece start.
    labels = batch["labels"][keep].clone()
    starts = torch.cumsum(lengths, 0) - lengths
    labels[starts[1:].long()] = IGNORE_INDEX
    return {
        "input_ids": batch["input_ids"][keep][None],
        "labels": labels[None],
        "position_ids": batch["position_ids"][keep][None],
        "packed_seq_lengths": lengths,
    }


def model_inputs(
    batch: dict[str, torch.Tensor], layout: str, device: torch.device, mask_dtype: torch.dtype = torch.bool
) -> dict[str, torch.Tensor]:
    """Return the forward-pass keyword arguments for one micro-batch in the backend's attention layout.

    Args:
        batch: a batch from `collate_rows`.
        layout: `mask` (padded rows and a 4D mask, for eager/SDPA), `varlen` (flat row and position
            ids, for flash attention) or `unsloth` (flat row plus `packed_seq_lengths`).
        device: device to move the tensors to, except `packed_seq_lengths`, which stays on the CPU.
        mask_dtype: dtype of the 4D mask, see `block_causal_mask`.
    """
    if layout == "mask":
        inputs = {name: batch[name] for name in ("input_ids", "labels", "position_ids")}
        inputs["attention_mask"] = block_causal_mask(batch["seq_lengths"], batch["input_ids"].shape[1], mask_dtype)
    else:
        inputs = to_packed_layout(batch)
        if layout == "varlen":
            # transformers finds the sequence boundaries of flash attention from the position ids alone.
            del inputs["packed_seq_lengths"]
    moved = {name: tensor.to(device, non_blocking=True) for name, tensor in inputs.items()}
    if "packed_seq_lengths" in inputs:
        # Unsloth 2026.10.9 reads the lengths on the host. From a CPU tensor it makes one pinned
        # host-to-device copy, but from a GPU tensor it copies them back, which waits for the GPU
        # on every forward pass.
        moved["packed_seq_lengths"] = inputs["packed_seq_lengths"]
    return moved
