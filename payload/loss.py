"""The training loss without the whole row's logits: cross-entropy over the answer tokens only, a chunk at a time.

A causal LM's forward computes `lm_head` over every position of the batch and keeps the logits (positions x vocab, in
fp32 for the loss) and their gradient: for a 2,048-token row and a 152k vocabulary that is 1.2 GB twice, most of it for
prompt positions the loss ignores. Here, when labels are given, the decoder's hidden states of the positions that have
a target are taken, `lm_head` runs on `CHUNK` of them at a time, and each chunk's logits are recomputed in the
backward pass instead of kept (activation checkpointing of the chunk): at most one chunk's logits live at once.

The result is transformers' own loss (`ForCausalLMLoss`: labels shifted left by one, -100 ignored, a sum divided by
`num_items_in_batch` when the Trainer gives it, else the mean), checked against it in tests/payload/test_loss.py.
It is installed on model types whose logits are exactly `lm_head(hidden)`; others (logit soft-capping, scaled
logits) keep their own forward. Without labels (generation, serving) the model's own forward runs unchanged.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
CHUNK = 1024                # positions per lm_head call: 1024 x 152k x 4 bytes = 0.6 GB at most for a Qwen-sized vocab
# Causal LMs whose forward is `logits = lm_head(decoder(...).last_hidden_state)` with nothing after it (transformers
# 5.24's modeling files). Gemma 2/3 soft-cap their logits, Cohere and Granite scale them: they are not listed.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"})


def _chunk_loss_sum(hidden, targets, head):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_causal_lm_loss(hidden, labels, head, num_items_in_batch=None, chunk: int = CHUNK):
    """transformers' causal-LM loss of `head(hidden)` against `labels` (batch x length), computed `chunk` target
    positions at a time, each chunk's logits recomputed in the backward pass."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if keep.numel() == 0:
        # No target in the batch: a zero that still reaches every trainable weight (DDP expects every gradient).
        total = flat.sum() * 0.0 + sum(p.sum() for p in head.parameters() if p.requires_grad) * 0.0
    else:
        picked, targets = flat.index_select(0, keep), targets.index_select(0, keep)
        total = sum(checkpoint(_chunk_loss_sum, picked[i:i + chunk], targets[i:i + chunk], head, use_reentrant=False)
                    for i in range(0, picked.shape[0], chunk))
    if num_items_in_batch is None:
        return total / max(int(keep.numel()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def supports(model) -> bool:
    """Whether the chunked loss computes exactly what `model`'s own forward does."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in PLAIN_HEAD_MODELS and hasattr(model, "lm_head") \
        and hasattr(model, "model") and not getattr(config, "final_logit_softcapping", None)


def _inner(model):
    """The causal LM itself, inside a PEFT model or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def installed(model) -> bool:
    return bool(getattr(_inner(model), "_tuneops_chunked_loss", False))


def install(model) -> bool:
    """Give `model` (a causal LM, or a PEFT model around one) the chunked loss for calls with labels. Returns whether
    it was installed (False: the model type is not one whose logits are plain `lm_head(hidden)`)."""
    inner = _inner(model)
    if not supports(inner):
        return False
    if installed(inner):
        return True
    own_forward = inner.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                use_cache=None, **kwargs: Any):
        if labels is None or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               labels=labels, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = inner.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        loss = chunked_causal_lm_loss(outputs.last_hidden_state, labels, inner.lm_head, num_items_in_batch)
        # No logits: nothing in training or the held-out loss reads them, and keeping them is what this avoids.
        return CausalLMOutputWithPast(loss=loss, logits=None)

    inner.forward = forward
    inner._tuneops_chunked_loss = True
    return True
