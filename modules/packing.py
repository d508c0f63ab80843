"""Padding-free packing: many samples per row, none attending to another.

Samples are packed into bins of at most max_seq_len tokens by best-fit decreasing. A micro-batch
of bins is flattened into one row with no padding at all; position_ids restart at 0 for every
sample, and that is what keeps attention inside each sample:
- flash_attention_2 (flash-attn installed) and our `varlen` backend (PyTorch's own FlashAttention
  varlen kernel) run variable-length attention over the cumulative sample lengths (cu_seq_lens);
- sdpa and eager get a block-diagonal causal mask, which transformers builds from the restarting
  position_ids. Exact, but it costs a mask of row x row: the CPU path and the fallback.
The first label of every sample is -100 (nothing precedes it), so no sample is trained to
predict the next one's first token, and the token-weighted loss equals that of unpacked rows.
"""

import inspect
from dataclasses import dataclass

import torch

from modules.tokens import IGNORE_INDEX, scored_positions

VARLEN = "varlen"  # the attn_implementation name registered with transformers


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity, longest first.

    Each sample goes into the fullest bin it still fits in (best fit). Bins are found through a
    Fenwick tree over free space, so packing a million samples takes seconds, not hours. The tree
    spans no more slots than the samples hold tokens (no bin can hold more), so its memory grows
    with the data, not with a huge capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    too_long = next((i for i in order if lengths[i] > capacity), None)
    if too_long is not None:
        raise ValueError(f"sample {too_long} has {lengths[too_long]} tokens, more than the bin capacity {capacity}")
    capacity = min(capacity, sum(lengths))
    tree = [0] * (capacity + 1)  # counts of bins by free space 1..capacity
    by_space: dict[int, list[int]] = {}
    bins: list[list[int]] = []

    def add(space: int, delta: int) -> None:
        while space <= capacity:
            tree[space] += delta
            space += space & -space

    def count_below(space: int) -> int:  # bins with free space < space
        total, space = 0, space - 1
        while space > 0:
            total += tree[space]
            space -= space & -space
        return total

    def kth(k: int) -> int:  # the smallest free space s with count_below(s + 1) >= k
        position, step = 0, 1 << capacity.bit_length()
        while step:
            if position + step <= capacity and tree[position + step] < k:
                position += step
                k -= tree[position]
            step >>= 1
        return position + 1

    for index in order:
        size = lengths[index]
        below = count_below(size)
        if below < count_below(capacity + 1):
            space = kth(below + 1)  # the tightest bin with room
            number = by_space[space].pop()
            add(space, -1)
        else:
            space, number = capacity, len(bins)
            bins.append([])
        bins[number].append(index)
        if space - size > 0:
            by_space.setdefault(space - size, []).append(number)
            add(space - size, 1)
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """Bins of tokenized samples; item i is the list of samples of bin i."""

    def __init__(self, samples, capacity: int):
        self.samples = samples
        self.lengths = list(samples["length"])  # tokenize_rows stores each sample's length
        self.bins = best_fit_decreasing(self.lengths, capacity)
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> list[dict]:
        rows = self.samples[self.bins[index]]  # one read for the whole bin
        return [
            {"input_ids": ids, "labels": labels} for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
        ]

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> torch.utils.data.Subset:
        """A contiguous 1/num_shards of the bins, with no bin repeated (for evaluation)."""
        size, extra = divmod(len(self), num_shards)
        start = index * size + min(index, extra)
        return torch.utils.data.Subset(self, range(start, start + size + (index < extra)))

    @property
    def efficiency(self) -> float:
        """Real tokens over the slots of the bins (bins x capacity)."""
        return sum(self.lengths) / max(len(self.bins) * self.capacity, 1)


@dataclass
class PackedCollator:
    """Flattens a micro-batch of bins into one row: no padding, positions restarting per sample.

    With `varlen_kwargs`, it also passes the cumulative sample lengths that varlen attention
    kernels take (cu_seq_lens_q/k, max_length_q/k), so they need not be derived on the GPU.
    """

    varlen_kwargs: bool = False

    def __call__(self, bins: list[list[dict]]) -> dict[str, torch.Tensor]:
        samples = [sample for packed in bins for sample in packed]
        lengths = [len(sample["input_ids"]) for sample in samples]
        input_ids = torch.tensor([token for sample in samples for token in sample["input_ids"]])
        labels = torch.tensor([label for sample in samples for label in sample["labels"]])
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX  # no sample predicts the first token of the next
        positions = torch.cat([torch.arange(length) for length in lengths])
        batch = {"input_ids": input_ids[None], "labels": labels[None], "position_ids": positions[None]}
        batch["scored_positions"] = scored_positions(batch["labels"])
        if self.varlen_kwargs:
            cumulative = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch |= {
                "cu_seq_lens_q": cumulative,
                "cu_seq_lens_k": cumulative,
                "max_length_q": max(lengths),
                "max_length_k": max(lengths),
            }
        return batch


def real_tokens(batch: dict) -> torch.Tensor | int:
    """Tokens of real data in a batch (padding excluded)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].numel()


# ---- PyTorch's FlashAttention varlen kernel as a transformers attention backend ----


def varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def same_length_rows(q, k, v, rows: int, scale: float | None) -> torch.Tensor:
    """Causal attention over `rows` samples of equal length, packed one after another as (tokens,
    heads, dim): a dense batch, which needs no varlen kernel. SDPA picks its fastest kernel for it,
    on an H200 cuDNN's: 45 ms of a Llama-3-8B step at 4 x 2,048 tokens in Unsloth's profile, against
    74 for the FlashAttention-2 varlen kernel in ours; sending such rows here took our step from
    15,075 to 15,442 tokens/s (benchmarks/README.md, 2026-12-01).

    Grouped key/value heads go in as they are (`enable_gqa`): on an H200 (torch 2.11) SDPA still
    picks cuDNN's kernel, at 4 x 2,048 tokens 1.14 ms forward and backward a layer against 1.34 with
    the heads repeated, and at 65,536 tokens 0.75 GiB less memory a layer's backward (2026-12-01)."""
    q, k, v = (tensor.unflatten(0, (rows, -1)).transpose(1, 2) for tensor in (q, k, v))  # (rows, heads, length, dim)
    grouped = k.shape[1] != q.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=grouped)
    return out.transpose(1, 2).flatten(0, 1)  # (tokens, heads, dim)


def register_varlen_attention() -> None:
    """Make attn_implementation="varlen" available to transformers models.

    Packed batches (with cu_seq_lens) run the varlen kernel and need no mask at all. Anything else,
    such as generating samples or chatting with the trained model, runs SDPA with its usual mask.
    """
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    native_gqa = "enable_gqa" in parameters

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cumulative = kwargs.get("cu_seq_lens_q")
        if cumulative is None or query.shape[0] != 1:  # not a packed batch
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if dropout:
            raise ValueError("the varlen attention backend has no attention dropout")
        # (1, heads, tokens, dim) -> (tokens, heads, dim)
        q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))
        # Grouped key/value heads (GQA) go to the kernel as they are: FlashAttention-2 reads each
        # key/value head for its group of query heads. Repeating them per query head cost 4 ms of a
        # Llama-3-8B step at 4 x 2,048 tokens, and a sum over the copies in backward (2026-11-30).
        # torch >= 2.13 asks for enable_gqa=True; 2.11 passes grouped heads through unchecked (tested on
        # an H200; 2.10 and 2.12 not tried).
        gqa = {"enable_gqa": True} if native_gqa and k.shape[1] != q.shape[1] else {}
        cumulative = cumulative.to(q.device, torch.int32)
        longest = int(kwargs["max_length_q"])
        window = kwargs.get("sliding_window")
        mask = dict(causal)
        if window is not None and window < longest:
            if "window_size" not in parameters:
                raise ValueError(
                    f"this torch's varlen_attn has no sliding window ({window}); use attn_implementation sdpa"
                )
            mask = {"window_size": (window - 1, 0)}
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise ValueError("the varlen attention backend has no logit softcapping or sinks; use sdpa")
        rows = cumulative.shape[0] - 1
        if longest * rows == q.shape[0] and mask == causal:
            return same_length_rows(q, k, v, rows, scaling)[None], None
        out = varlen_attn(q, k, v, cumulative, cumulative, longest, longest, scale=scaling, **mask, **gqa)
        return out[None], None  # (1, tokens, heads, dim), as transformers' backends return

    AttentionInterface.register(VARLEN, varlen_attention)

    def varlen_mask(*args, attention_mask=None, **kwargs):
        # No 2-D mask given: a packed batch (the lengths say it all) or one unpadded sequence (causal).
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)
