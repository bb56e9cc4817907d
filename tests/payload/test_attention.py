"""Per-example attention: packs split where transformers splits them, the same logits and gradients as SDPA's
block-diagonal mask (4-bit base too), and SDPA itself outside training."""

from __future__ import annotations

import pytest

from payload import attention, data


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_example_spans_follow_restarting_positions():
    import torch

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert attention.example_spans(pos) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 8)]]


@pytest.mark.parametrize("quantized", [False, True])
def test_per_example_attention_equals_the_block_diagonal_mask(tiny_model, tokenizer, example_dataset, quantized):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = attention.register()
    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs.update(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", **kwargs).train()
    ours = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=name, **kwargs).train()
    examples = data.tokenize_records(data.read_records(example_dataset).records[:9], tokenizer, 256)
    packs = data.build_packs(examples, 100)
    batch = data.PackedRowsCollator(pad_token_id=0)(packs[:3])
    assert any(len(r) > 1 for r in attention.example_spans(batch["position_ids"]))

    def run(model):
        model.zero_grad()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out.logits, model.lm_head.weight.grad.clone() if not quantized else out.loss.detach()

    (a, ga), (b, gb) = run(ref), run(ours)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)
    # Outside training (evaluation, generation) it is SDPA itself.
    ours.eval()
    with torch.no_grad():
        ids = torch.tensor([examples[0].input_ids])
        torch.testing.assert_close(ours(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
