"""The chunked loss: transformers' own loss and gradients, without ever keeping the logits of the whole batch."""

from __future__ import annotations

import pytest

from payload import data, loss


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def batches(tokenizer):
    from payload.tinymodel import example_dataset_path

    examples = data.tokenize_records(data.read_records(example_dataset_path()).records[:12], tokenizer, 256)
    packs = data.build_packs(examples, 120)
    return {"packed": data.PackedRowsCollator(pad_token_id=0)(packs[:3]),
            "padded": data.PaddedCollator(pad_token_id=0)(data.single_examples(examples)[:4])}


def _model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").train()


def _loss_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, use_cache=False, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in ("lm_head.weight",
                                                                             "model.layers.0.mlp.up_proj.weight")}
    return out.loss.detach(), grads


@pytest.mark.parametrize("kind", ["packed", "padded"])
@pytest.mark.parametrize("items", [None, 97])
def test_the_same_loss_and_gradients_as_transformers(tiny_model, batches, kind, items, monkeypatch):
    import torch

    monkeypatch.setattr(loss, "CHUNK", 7)         # many chunks, the last one short
    batch = batches[kind]
    kw = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    ref = _model(tiny_model)
    ours = _model(tiny_model)
    assert loss.install(ours)
    a, ga = _loss_and_grads(ref, batch, **kw)
    b, gb = _loss_and_grads(ours, batch, **kw)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert set(gb) == set(ga) == {"lm_head.weight", "model.layers.0.mlp.up_proj.weight"}
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-6, rtol=1e-4)


def test_no_saved_tensor_holds_the_whole_batchs_logits(tiny_model, batches):
    import torch

    batch = batches["packed"]
    vocab = _model(tiny_model).config.vocab_size
    positions = batch["input_ids"].numel()

    def largest_saved(model) -> int:
        """The most positions' logits (or their softmax) any tensor saved for the backward pass holds."""
        sizes = [0]

        def pack(t):
            if t.dim() and t.shape[-1] == vocab:
                sizes.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch, use_cache=False).loss.backward()
        return max(sizes)

    own = largest_saved(_model(tiny_model))
    chunked = _model(tiny_model)
    loss.install(chunked)
    assert own >= positions                             # the model's own forward keeps every position's logits
    assert largest_saved(chunked) == 0                  # here none: each chunk's are recomputed in the backward pass


def test_a_batch_without_targets_is_a_zero_that_still_backpropagates(tiny_model, batches):
    import torch

    batch = {**batches["padded"]}
    batch["labels"] = torch.full_like(batch["labels"], data.IGNORE_INDEX)
    model = _model(tiny_model)
    loss.install(model)
    out = model(**batch, use_cache=False)
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and float(model.lm_head.weight.grad.abs().sum()) == 0.0


def test_without_labels_the_models_own_forward_gives_logits(tiny_model, batches):
    import torch

    ref, ours = _model(tiny_model).eval(), _model(tiny_model).eval()
    loss.install(ours)
    ids = batches["padded"]["input_ids"][:1]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_installed_through_a_peft_model_and_only_on_plain_heads(tiny_model, batches):
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tiny_model), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert loss.install(model) and loss.install(model)          # idempotent
    out = model(**batches["packed"], use_cache=False)
    assert out.logits is None and torch.isfinite(out.loss)
    other = _model(tiny_model)
    other.config.model_type = "gemma2"                          # soft-capped logits: its own forward stays
    assert not loss.install(other) and other(**batches["packed"], use_cache=False).logits is not None
