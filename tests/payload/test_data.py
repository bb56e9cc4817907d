"""Dataset checks (each error with its line), loss masks, packing, and no attention across packed examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payload import data
from payload.data import IGNORE_INDEX, Record

GOOD_CHAT = {"messages": [{"role": "user", "content": "how do i restart the gateway?"},
                          {"role": "assistant", "content": "run tuneops restart gateway."}]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def good_lines(n: int = 10) -> list:
    return [GOOD_CHAT] * n


@pytest.mark.parametrize("bad, reason", [
    ('{"messages": [', "bad JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"question": "x"}, "missing key"),
    ({"prompt": "x"}, "missing key 'completion'"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"content": "x"}]}, "has no 'role'"),
    ({"messages": [{"role": "user"}]}, "has no 'content'"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "must be a string"),
    ({"prompt": "x", "completion": ""}, "empty content"),
    ({"text": ""}, "empty content"),
    ({"prompt": "why?", "completion": "because."}, "mixed formats"),
    ({"text": "plain words"}, "mixed formats"),
])
def test_each_problem_is_reported_with_its_line(tmp_path, bad, reason):
    lines = good_lines(12)
    lines.insert(6, bad)                       # line 7
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    result = data.read_records(path)
    assert result.errors == [next(e for e in result.errors if e.startswith(f"{path}:7: "))]
    assert reason in result.errors[0]
    assert len(result.records) == 12 and all(r.line != 7 for r in result.records)


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD_CHAT).encode()] * 10 + [b'{"text": "caf\xe9"}']) + b"\n")
    result = data.read_records(path)
    assert result.errors == [f"{path}:11: not UTF-8 text; save the file as UTF-8"]


def test_fewer_than_ten_examples_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", good_lines(9))
    assert data.read_records(path).errors == [f"{path}: only 9 valid examples; at least 10 are needed to fine-tune"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "no valid example" in data.read_records(empty).errors[0]
    missing = data.read_records(tmp_path / "nope.jsonl")
    assert missing.errors == [f"{tmp_path / 'nope.jsonl'}: dataset file not found "
                              "(paths are relative to the workspace root)"]


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "\n".join([json.dumps(GOOD_CHAT)] * 10) + "\n\n{oops\n")
    result = data.read_records(path)
    assert [r.line for r in result.records] == list(range(2, 12))
    assert result.errors == [f"{path}:13: bad JSON: Expecting property name enclosed in double quotes at column 2"]


def test_mixed_formats_blame_the_minority(tmp_path):
    lines = [{"prompt": "p", "completion": "c"}] * 3 + good_lines(10)
    result = data.read_records(write_jsonl(tmp_path / "d.jsonl", lines))
    assert result.format == "messages"
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in result.errors] == ["1", "2", "3"]


def test_shipped_examples_are_valid(example_dataset):
    result = data.read_records(example_dataset)
    assert result.errors == [] and result.format == "messages" and len(result.records) >= 50


def test_split_is_deterministic_and_disjoint(example_dataset):
    records = data.read_records(example_dataset).records
    train, evals = data.split_records(records, 0.1, seed=42)
    assert len(evals) == 8 and len(train) == 72
    assert {r.line for r in train}.isdisjoint({r.line for r in evals})
    assert data.split_records(records, 0.1, seed=42) == (train, evals)
    assert data.split_records(records, 0.1, seed=7)[1] != evals
    assert data.split_records(records, 0.0, seed=42) == (records, [])


# --- tokenization and loss masks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_chat_loss_counts_only_assistant_tokens(tokenizer):
    rec = Record(1, "messages", {"messages": [
        {"role": "system", "content": "you are the ops bot."},
        {"role": "user", "content": "restart the gateway"},
        {"role": "assistant", "content": "run tuneops restart gateway."},
        {"role": "user", "content": "and the metrics?"},
        {"role": "assistant", "content": "run tuneops restart metrics."}]})
    ex = data.tokenize_record(rec, tokenizer, 1024)
    trained = tokenizer.convert_ids_to_tokens([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained == "run tuneops restart gateway . <|end|> run tuneops restart metrics . <|end|>".split()
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex.input_ids, ex.labels))


def test_template_without_generation_markers_gets_the_same_mask(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    rec = Record(1, "messages", {"messages": [
        {"role": "user", "content": "restart the gateway"}, {"role": "assistant", "content": "run it."},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome."}]})
    a = data.tokenize_record(rec, tokenizer, 1024)
    b = data.tokenize_record(rec, plain, 1024)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert a.trainable_tokens > 0


def test_prompt_completion_and_text_masks(tokenizer):
    pc = data.tokenize_record(Record(1, "prompt_completion", {"prompt": "restart the gateway",
                                                              "completion": "run it."}), tokenizer, 1024)
    trained = [t for t, lab in zip(pc.input_ids, pc.labels) if lab != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(trained) == ["run", "it", ".", "<|end|>"]
    text = data.tokenize_record(Record(1, "text", {"text": "run it ."}), tokenizer, 1024)
    assert text.labels[0] == IGNORE_INDEX and text.labels[1:] == text.input_ids[1:]


def test_overlong_examples_are_cut(tokenizer):
    rec = Record(3, "text", {"text": " ".join(["gateway"] * 50)})
    ex = data.tokenize_record(rec, tokenizer, 16)
    assert len(ex.input_ids) == 16 and ex.full_length == 51 and ex.truncated


def test_fallback_chat_template_for_tokenizers_without_one(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    assert data.ensure_chat_template(bare) is True
    assert data.ensure_chat_template(bare) is False
    ex = data.tokenize_record(Record(1, "messages", GOOD_CHAT), bare, 1024)
    trained = tokenizer.convert_ids_to_tokens([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained == ["run", "tuneops", "restart", "gateway", ".", "<|end|>"]


# --- packing -----------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), max_size=60), st.integers(64, 200))
def test_pack_places_every_example_once_within_capacity(lengths, capacity):
    packs = data.pack(lengths, capacity)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= capacity for p in packs)
    # First fit leaves no two packs that would fit in one (the later one's first example did not fit in the earlier),
    # so at most one pack is half empty. (11/9 OPT is FFD's bound against the true optimum, which total / capacity
    # can underestimate by far: six examples of 33 tokens need six packs of 64.)
    sums = [sum(lengths[i] for i in p) for p in packs]
    assert all(a + b > capacity for i, a in enumerate(sums) for b in sums[i + 1:])
    assert len(packs) <= 2 * sum(lengths) / capacity + 1


def test_pack_of_examples_that_cannot_share_is_one_each():
    assert sorted(data.pack([32, 33, 33, 33, 33, 33], 64)) == [[0], [1], [2], [3], [4], [5]]


def test_pack_rejects_examples_over_capacity():
    with pytest.raises(ValueError, match="more than the pack capacity"):
        data.pack([10, 300], 128)


def test_build_packs_keeps_every_token_and_mask(tokenizer, example_dataset):
    records = data.read_records(example_dataset).records
    examples = data.tokenize_records(records, tokenizer, 128)
    packs = data.build_packs(examples, 128)
    assert all(len(p["input_ids"]) <= 128 for p in packs)
    # every example appears exactly once, whole, with its labels, and its positions start at 0
    pieces = []
    for p in packs:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert p["position_ids"][a:b] == list(range(b - a))
            assert p["labels"][a] == IGNORE_INDEX          # no target across an example boundary
            pieces.append((tuple(p["input_ids"][a:b]), tuple(p["labels"][a:b])))
    assert sorted(pieces) == sorted((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(e.input_ids) for e in examples)
    # the packs are well filled, and the padding-free path computes no padding at all
    assert data.pack_fill(examples, 128) > 0.85
    assert data.padding_waste([[len(p["input_ids"]) for p in packs[i:i + 4]] for i in range(0, len(packs), 4)],
                              padded=False) == 0.0


def test_padding_waste_of_plain_batches():
    assert data.padding_waste([[10, 5], [8, 8]], padded=True) == pytest.approx(1 - 31 / 36)
    assert data.padding_waste([], padded=True) == 0.0


def test_collators(tokenizer):
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    flat = data.PaddingFreeCollator()(feats)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in flat
    rows = data.PackedRowsCollator(pad_token_id=0)([{**feats[0], "position_ids": [0, 0, 1]}, feats[1]])
    assert rows["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert rows["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert rows["position_ids"].tolist() == [[0, 0, 1], [0, 1, 0]]
    assert "attention_mask" not in rows
    padded = data.PaddedCollator(pad_token_id=0)(feats)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("quantized", [False, True])
def test_no_attention_leaks_across_packed_examples(tiny_model, tokenizer, example_dataset, quantized):
    """The logits of each example alone equal its logits inside a pack, flattened or in rows (4-bit base too)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs.update(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, **kwargs).eval()
    records = data.read_records(example_dataset).records[:7]
    examples = data.tokenize_records(records, tokenizer, 256)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]

        def check_row(ids, positions, members):
            logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
            # The same row with positions running on is what a leak looks like: the check must be able to see it.
            leaky = model(input_ids=ids[None], use_cache=False).logits[0]
            offset = 0
            for k in members:
                n = len(examples[k].input_ids)
                torch.testing.assert_close(logits[offset:offset + n], alone[k], atol=1e-5, rtol=1e-4)
                if offset:
                    assert not torch.allclose(leaky[offset:offset + n], alone[k], atol=1e-3)
                offset += n

        feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        flat = data.PaddingFreeCollator()(feats)
        check_row(flat["input_ids"][0], flat["position_ids"][0], range(len(examples)))

        packs = data.build_packs(examples, 120)
        assert len(packs) >= 2
        rows = data.PackedRowsCollator(tokenizer.pad_token_id)(packs)
        batched = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits
        groups = data.pack([len(e.input_ids) for e in examples], 120)
        for r, group in enumerate(groups):
            offset = 0
            for k in group:
                n = len(examples[k].input_ids)
                torch.testing.assert_close(batched[r, offset:offset + n], alone[k], atol=1e-5, rtol=1e-4)
                offset += n
