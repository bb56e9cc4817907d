"""Training data: the three JSONL formats, their checks, tokenization with loss masks, packing and the collators.

Reading and checking records is torch-free (the bot validates datasets before queueing); tokenization needs a
tokenizer and the collators need torch, both imported only where used.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

IGNORE_INDEX = -100          # label value the loss skips (transformers' convention)
MIN_EXAMPLES = 10
ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "prompt_completion", "text")
FORMAT_NAMES = {"messages": '{"messages": [...]}', "prompt_completion": '{"prompt", "completion"}', "text": '{"text"}'}

# Used when a tokenizer has no chat template of its own (base models often have none); the generation markers
# let transformers return the assistant mask.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '### ' + message['role'] + ':\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


class DataError(ValueError):
    """A dataset problem a person can fix; the message names the file (and line) and says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Records: reading and checking, torch-free
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One valid example: its 1-based line number, its format and its fields."""

    line: int
    format: str
    data: dict[str, Any]


@dataclass
class ReadResult:
    path: str
    records: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    format: str | None = None


def record_format(obj: dict[str, Any]) -> str | None:
    """Which of the three formats a JSON object claims to be, by its keys; None when it claims none."""
    if "messages" in obj:
        return "messages"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _non_empty_string(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def check_record(obj: Any) -> tuple[str | None, str | None]:
    """Check one parsed JSON line. Returns (format, None) when valid, else (format or None, reason)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    fmt = record_format(obj)
    if fmt is None:
        keys = ", ".join(sorted(obj)) or "none"
        return None, ("missing key: expected 'messages', 'prompt' and 'completion', or 'text' "
                      f"(keys found: {keys})")
    if fmt == "messages":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return fmt, "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
        for i, msg in enumerate(messages, 1):
            if not isinstance(msg, dict):
                return fmt, f"message {i} is not an object"
            if "role" not in msg:
                return fmt, f"message {i} has no 'role'"
            if "content" not in msg:
                return fmt, f"message {i} has no 'content'"
            if msg["role"] not in ROLES:
                return fmt, f"message {i} has unknown role {msg['role']!r} (use {', '.join(ROLES)})"
            if not isinstance(msg["content"], str):
                return fmt, f"message {i} content must be a string"
            if not msg["content"].strip():
                return fmt, f"message {i} ({msg['role']}) has empty content"
        if not any(m["role"] == "assistant" for m in messages):
            return fmt, "no assistant message: there is nothing to learn from this example"
        return fmt, None
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                return fmt, f"missing key '{key}' (the prompt/completion format needs both)"
            if not isinstance(obj[key], str):
                return fmt, f"'{key}' must be a string"
        if not obj["completion"].strip():
            return fmt, "empty content: 'completion' is empty"
        if not obj["prompt"].strip():
            return fmt, "empty content: 'prompt' is empty"
        return fmt, None
    if not isinstance(obj["text"], str):
        return fmt, "'text' must be a string"
    if not obj["text"].strip():
        return fmt, "empty content: 'text' is empty"
    return fmt, None


def read_records(path: str | Path, min_examples: int = MIN_EXAMPLES, max_errors: int = 200) -> ReadResult:
    """Read and check a JSONL dataset. Every problem becomes one `file:line: reason` error; nothing is raised
    for bad content (a missing or unreadable file is one error naming the file)."""
    p = Path(path)
    result = ReadResult(path=str(p))
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        result.errors.append(f"{p}: dataset file not found (paths are relative to the workspace root)")
        return result
    except IsADirectoryError:
        result.errors.append(f"{p}: is a folder, expected a .jsonl file")
        return result
    except OSError as e:
        result.errors.append(f"{p}: cannot read the dataset: {e.strerror}")
        return result

    formats_by_line: list[tuple[int, str, dict]] = []
    errors: list[tuple[int, str]] = []
    for lineno, raw_line in enumerate(raw.split(b"\n"), 1):
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            errors.append((lineno, "not UTF-8 text; save the file as UTF-8"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append((lineno, f"bad JSON: {e.msg} at column {e.colno}"))
            continue
        fmt, reason = check_record(obj)
        if reason is not None:
            errors.append((lineno, reason))
        else:
            formats_by_line.append((lineno, fmt, obj))

    # The file's format is the one most of its valid lines use (the first seen wins a tie); others are errors.
    counts = Counter(fmt for _, fmt, _ in formats_by_line)
    if counts:
        order = {fmt: i for i, (_, fmt, _) in reversed(list(enumerate(formats_by_line)))}
        result.format = max(counts, key=lambda f: (counts[f], -order[f]))
    for lineno, fmt, obj in formats_by_line:
        if fmt != result.format:
            errors.append((lineno, f"mixed formats: this line is {FORMAT_NAMES[fmt]} but the file's other lines are "
                                   f"{FORMAT_NAMES[result.format]}; use one format per file"))
        else:
            result.records.append(Record(lineno, fmt, _normalize(fmt, obj)))

    errors.sort()
    shown = errors[:max_errors]
    result.errors.extend(f"{p}:{line}: {reason}" for line, reason in shown)
    if len(errors) > max_errors:
        result.errors.append(f"{p}: {len(errors) - max_errors} more problems not shown")
    if len(result.records) < min_examples:
        n = len(result.records)
        what = "no valid example" if n == 0 else f"only {n} valid example{'s' if n != 1 else ''}"
        result.errors.append(f"{p}: {what}; at least {min_examples} are needed to fine-tune")
    return result


def _normalize(fmt: str, obj: dict[str, Any]) -> dict[str, Any]:
    # Keep only the fields training uses, so that extra keys (ids, sources) never reach the tokenizer.
    if fmt == "messages":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]}
    if fmt == "prompt_completion":
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    return {"text": obj["text"]}


def split_records(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic train/eval split: the same records, fraction and seed give the same split on every restart."""
    if eval_fraction <= 0 or len(records) < 2:
        return list(records), []
    n_eval = min(len(records) - 1, max(1, round(len(records) * eval_fraction)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals


def estimate_tokens(record: Record, chars_per_token: float = 4.0) -> int:
    """A tokenizer-free estimate (about 4 characters a token for English BPE vocabularies), plus a few per turn."""
    d = record.data
    if record.format == "messages":
        return sum(math.ceil(len(m["content"]) / chars_per_token) + 4 for m in d["messages"])
    if record.format == "prompt_completion":
        return math.ceil((len(d["prompt"]) + len(d["completion"])) / chars_per_token) + 2
    return math.ceil(len(d["text"]) / chars_per_token) + 2


# ---------------------------------------------------------------------------------------------------------------
# Tokenization with loss masks
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]            # IGNORE_INDEX where the loss does not count
    line: int
    full_length: int             # before truncation

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template a plain one; True when the fallback was installed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def _chat_ids_and_mask(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    template = tokenizer.chat_template or ""
    if "generation" in template:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        if any(mask):
            return ids, mask
    # Templates without generation markers: an assistant turn's tokens are those between the prompt that leads
    # up to it (rendered with the generation prompt) and the conversation that ends with it.
    ids = _render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(_render_ids(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
        for j in range(start, min(end, len(ids))):
            mask[j] = 1
    return ids, mask


def _render_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def tokenize_record(record: Record, tokenizer, max_seq_length: int) -> TokenizedExample:
    """Token ids and labels for one record; the loss counts only assistant (chat) or completion tokens, or every
    token of a `text` record. Over-long examples are cut at `max_seq_length`."""
    d = record.data
    if record.format == "messages":
        ids, mask = _chat_ids_and_mask(d["messages"], tokenizer)
    elif record.format == "prompt_completion":
        prompt = tokenizer(d["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(d["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        ids, mask = list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion)
    else:
        ids = list(tokenizer(d["text"], add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        mask = [1] * len(ids)
    full = len(ids)
    ids, mask = ids[:max_seq_length], mask[:max_seq_length]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    # The first token has nothing before it inside its example; in a pack the token before it belongs to another
    # example, so it must never be a target.
    if labels:
        labels[0] = IGNORE_INDEX
    return TokenizedExample(ids, labels, record.line, full)


def tokenize_records(records: Iterable[Record], tokenizer, max_seq_length: int) -> list[TokenizedExample]:
    return [tokenize_record(r, tokenizer, max_seq_length) for r in records]


def prompt_for_generation(record: Record, tokenizer) -> tuple[list[int], str]:
    """The prompt ids for a held-out example (everything before its last answer) and the reference answer."""
    d = record.data
    if record.format == "messages":
        msgs = d["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ids = _render_ids(tokenizer, msgs[:last], add_generation_prompt=True)
        return ids, msgs[last]["content"]
    if record.format == "prompt_completion":
        return list(tokenizer(d["prompt"], add_special_tokens=True)["input_ids"]), d["completion"]
    ids = list(tokenizer(d["text"], add_special_tokens=True)["input_ids"])
    half = max(1, len(ids) // 2)
    return ids[:half], tokenizer.decode(ids[half:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------

def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into packs of at most `capacity` tokens (first-fit decreasing); every index appears
    in exactly one pack. Deterministic, so a restarted run packs the same way."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the pack capacity {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                packs[b].append(i)
                room[b] -= n
                break
        else:
            packs.append([i])
            room.append(capacity - n)
    return packs


def build_packs(examples: list[TokenizedExample], capacity: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into packs with position ids that restart at 0 for each example."""
    packs = []
    for group in pack([len(e.input_ids) for e in examples], capacity):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in group:
            e = examples[i]
            ids += e.input_ids
            labels += e.labels
            positions += range(len(e.input_ids))
        packs.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packs


def single_examples(examples: list[TokenizedExample]) -> list[dict[str, list[int]]]:
    """One item per example, for the padded (no packing) path."""
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def pack_fill(examples: list[TokenizedExample], capacity: int) -> float:
    """How full the packs are: tokens / (packs x capacity). What padding to a fixed length would waste is 1 - fill."""
    lengths = [len(e.input_ids) for e in examples]
    if not lengths:
        return 0.0
    return sum(lengths) / (len(pack(lengths, capacity)) * capacity)


def padding_waste(batches_lengths: Iterable[list[int]], padded: bool) -> float:
    """The share of computed positions that are padding. `batches_lengths` holds, per micro-batch, the length of
    each row; a padded batch computes rows x longest, a flattened (padding-free) one exactly the tokens."""
    real = computed = 0
    for lengths in batches_lengths:
        real += sum(lengths)
        computed += len(lengths) * max(lengths) if padded else sum(lengths)
    return 0.0 if computed == 0 else 1.0 - real / computed


# ---------------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------------

def _right_padded(features: list[dict[str, list[int]]], pad_token_id: int
                  ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Ids and labels of each feature padded on the right to the longest one (padding is never a target), and how
    much padding each row got."""
    longest = max(len(f["input_ids"]) for f in features)
    pads = [longest - len(f["input_ids"]) for f in features]
    ids = [f["input_ids"] + [pad_token_id] * pad for f, pad in zip(features, pads)]
    labels = [f["labels"] + [IGNORE_INDEX] * pad for f, pad in zip(features, pads)]
    return ids, labels, pads


class PaddingFreeCollator:
    """Flattens a micro-batch into one row with no padding at all: position ids restart per example and there is
    no attention mask, so transformers builds a block-diagonal mask (examples never attend to each other).
    The model must run with `use_cache=False`."""

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            ids += f["input_ids"]
            labels += f["labels"]
            positions += f.get("position_ids") or list(range(len(f["input_ids"])))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }


class PackedRowsCollator:
    """One row per pack, rows padded to the longest pack of the micro-batch; position ids restart per example (and
    for the padding), no attention mask, so no example attends to another. For SDPA and eager attention, whose
    cost grows with the square of a row's length: flattening four packs into one row costs up to 4x the
    attention of four rows (measured 3x on CPU). With varlen flash attention, `PaddingFreeCollator` is the one."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids, labels, pads = _right_padded(features, self.pad_token_id)
        positions = [(f.get("position_ids") or list(range(len(f["input_ids"])))) + list(range(pad))
                     for f, pad in zip(features, pads)]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }


class PaddedCollator:
    """Plain right-padded batches with an attention mask: the baseline that packing is measured against."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids, labels, pads = _right_padded(features, self.pad_token_id)
        mask = [[1] * len(f["input_ids"]) + [0] * pad for f, pad in zip(features, pads)]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
