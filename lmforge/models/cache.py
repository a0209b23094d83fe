"""The KV cache of a decoder's self-attention, and the row operations continuous batching needs.

Rows are left-padded and right-aligned: every row's newest token sits in the last written column
(`length - 1`), and row r's real tokens fill columns `starts[r] .. length - 1`. Padding is therefore
only ever a run of leading columns, so one number per row describes it, and the attention mask and
the position ids follow from `starts`. The cache owns every change to its rows:

- `merge`: a batch of freshly prefilled rows joins, right-aligned with the rows already there;
- `drop`: finished rows leave; `trim` then removes leading columns that are padding in every row;
- `reorder`: keep or repeat rows (beam search).

Nothing outside this module reads or writes the key and value tensors, except attention, through
`update`. `StaticKVCache` is the same cache in the shape a compiled step wants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Keys and values of every layer, preallocated for `max_length` positions.

    All layers write the same positions in one forward pass; `advance` moves the
    write position once the pass is done.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, KV, max_length, D)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # columns written, the same for every row
        self.starts = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) each row's first real column

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # keys, values: (B, kv_heads, T, head_dim) -> everything cached so far, (B, kv_heads, length + T, head_dim)
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; asked for {end}")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def pad_left(self, lengths: Sequence[int]) -> None:
        """Before a prefill of left-padded prompts of these lengths: mark each row's leading padding."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.starts.device)  # (B,)
        self.starts = self.length + int(lengths.max()) - lengths

    def attention_mask(self, new_tokens: int = 0) -> torch.Tensor | None:
        """(B, length + new_tokens) long, 1 = real token; None when no row has padding (SDPA's fast path)."""
        if not bool(self.starts.any()):
            return None
        columns = torch.arange(self.length + new_tokens, device=self.starts.device)
        return (columns[None, :] >= self.starts[:, None]).long()

    def token_counts(self) -> torch.Tensor:
        """(B,) real tokens in each row: the position id of the row's next token."""
        return self.length - self.starts

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only (or repeat) the given rows, e.g. when sequences finish or beams are reordered."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]
        self.starts = self.starts[rows]

    def drop(self, rows: Sequence[int]) -> None:
        """Remove these rows (finished or cancelled sequences), then `trim`."""
        gone = set(rows)
        self.reorder(torch.tensor([row for row in range(self.batch_size) if row not in gone], device=self.keys.device))
        self.trim()

    def trim(self) -> None:
        """Remove the leading columns that are padding in every row, so the cache is as long as its longest row."""
        padding = int(self.starts.min()) if self.batch_size else self.length
        if not padding:
            return
        kept = self.length - padding
        # NOTE: clone: source and target columns overlap.
        self.keys[:, :, :, :kept] = self.keys[:, :, :, padding : self.length].clone()
        self.values[:, :, :, :kept] = self.values[:, :, :, padding : self.length].clone()
        self.length = kept
        self.starts = self.starts - padding

    def merge(self, other: KVCache, max_length: int) -> KVCache:
        """A cache with room for `max_length` columns holding this cache's rows, then `other`'s, right-aligned."""
        length = max(self.length, other.length)
        layers, _, heads, _, head_dim = self.keys.shape
        merged = KVCache(
            layers, self.batch_size + other.batch_size, heads, head_dim, max_length, self.keys.device, self.keys.dtype
        )
        merged.length = length
        begin = 0
        for part in (self, other):
            rows, shift = slice(begin, begin + part.batch_size), length - part.length
            merged.keys[:, rows, :, shift:length] = part.keys[:, :, :, : part.length]  # (layers, rows, KV, L, D)
            merged.values[:, rows, :, shift:length] = part.values[:, :, :, : part.length]
            merged.starts[rows] = part.starts + shift  # a shorter part gains leading padding
            begin += part.batch_size
        return merged

    def static(self, max_length: int) -> StaticKVCache:
        """This cache in a compiled step's shape, with room for `max_length` columns."""
        return StaticKVCache(self, max_length)


class StaticKVCache:
    """Keys and values for a compiled decoding step: one tensor per layer, written at a column held in a tensor.

    Nothing here is a Python number that changes from one step to the next, so a compiled step
    sees the same graph every time (a `KVCache` slices at its Python `length`, which a compiled
    graph would bake in). Attention reads all `max_length` columns; `key_mask` hides the ones not
    written yet and each row's padding. Separate tensors per layer, not views of one: a compiler
    copies the whole buffer when it sees a write into a view of an input.
    """

    def __init__(self, cache: KVCache, max_length: int) -> None:
        """A copy of `cache` (its first `cache.length` columns) with room for `max_length` columns."""
        layers, batch, heads, _, head_dim = cache.keys.shape
        self.keys: list[torch.Tensor] = []  # per layer (B, KV, max_length, D)
        self.values: list[torch.Tensor] = []
        for source, target in ((cache.keys, self.keys), (cache.values, self.values)):
            for layer in range(layers):
                buffer = source.new_zeros(batch, heads, max_length, head_dim)
                buffer[:, :, : cache.length] = source[layer, :, :, : cache.length]
                target.append(buffer)
        device = cache.keys.device
        self.column = torch.tensor([cache.length], device=device)  # (1,) where the next token goes
        self.starts = cache.starts.clone()  # (B,)
        columns = torch.arange(max_length, device=device)[None, :]
        # (B, max_length) bool: the columns each row may attend to, the next one included
        self.key_mask = (columns >= self.starts[:, None]) & (columns <= cache.length)
        self.position_ids = cache.token_counts()[:, None].clone()  # (B, 1) the next token's position

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # keys, values: (B, kv_heads, 1, head_dim) -> the whole buffer, (B, kv_heads, max_length, head_dim)
        self.keys[layer].index_copy_(2, self.column, keys)
        self.values[layer].index_copy_(2, self.column, values)
        return self.keys[layer], self.values[layer]

    def advance(self) -> None:
        """After a step: the next token goes one column further and may see this one."""
        self.column += 1
        self.position_ids += 1
        self.key_mask.index_fill_(1, self.column.clamp(max=self.max_length - 1), True)

    def dynamic(self, max_length: int) -> KVCache:
        """Back to a `KVCache` with room for `max_length` columns (to change its rows)."""
        length = int(self.column)
        batch, heads, _, head_dim = self.keys[0].shape
        device, dtype = self.keys[0].device, self.keys[0].dtype
        cache = KVCache(len(self.keys), batch, heads, head_dim, max(max_length, length), device, dtype)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            cache.keys[layer, :, :, :length] = keys[:, :, :length]
            cache.values[layer, :, :, :length] = values[:, :, :length]
        cache.length, cache.starts = length, self.starts.clone()
        return cache
