"""Per-example attention for packed rows where flash attention's varlen kernels are missing (the CPU).

SDPA with the block-diagonal mask that transformers builds for a pack computes every query against every key of the
row and then masks: the cost grows with the square of the pack's length. This attention runs SDPA's causal kernel on
each example of the pack on its own, so it grows with the sum of the examples' squares, as varlen flash attention
does on a GPU. Examples are found as transformers finds them: the position ids restart. Anything else (padded
batches, evaluation, generation with a cache) goes to transformers' own SDPA unchanged.
"""

from __future__ import annotations

NAME = "sdpa_per_example"


def example_spans(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a new one begins wherever the position does not go up by one."""
    spans = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def per_example_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query, key, value are (batch, heads, length, head_dim); returns
    (batch, length, heads, head_dim) and no weights."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = module.training and position_ids is not None and query.shape[2] == key.shape[2] > 1
    spans = example_spans(position_ids) if packed else None
    if not spans or all(len(row) == 1 for row in spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, row in enumerate(spans):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           is_causal=e - s > 1, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            for s, e in row], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make the attention known to transformers (idempotent); returns its `attn_implementation` name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, per_example_attention)
    # The mask is SDPA's, for the cases handed back to SDPA; packed rows ignore it.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
