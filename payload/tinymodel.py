"""Builds a tiny Llama-style model and its tokenizer on disk, with nothing downloaded.

Used by the tests, the demo and the CPU benchmark: `python -m payload.tinymodel OUT_DIR [--data FILE.jsonl]`.
The tokenizer is a WordLevel vocabulary made from the given data (or the shipped example data), with a chat template.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Role markers and an end marker per turn; `generation` marks the assistant's tokens for the loss mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|> {% generation %}{{ message['content'] }} <|end|>{% endgeneration %} "
    "{% else %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

WORD_RE = re.compile(r"\w+|[^\w\s]")


def example_dataset_path() -> Path:
    return Path(str(resources.files("payload") / "examples" / "chat.jsonl"))


def _texts(path: Path):
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "messages" in obj:
            for m in obj["messages"]:
                yield m.get("content", "")
        for key in ("prompt", "completion", "text"):
            if key in obj:
                yield obj[key]


def build_tokenizer(data_files: list[Path], vocab_extra: int = 0):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts: Counter[str] = Counter()
    for path in data_files:
        for text in _texts(path):
            counts.update(WORD_RE.findall(text.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word, _ in counts.most_common():
        vocab.setdefault(word, len(vocab))
    for i in range(vocab_extra):
        vocab.setdefault(f"w{i}", len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Role markers stay whole (they are special tokens); everything else splits into words and punctuation.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "</s>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def build_tiny_model(out_dir: str | Path, data_files: list[str | Path] | None = None, *, hidden_size: int = 64,
                     layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Write a tiny LlamaForCausalLM and its tokenizer to `out_dir`; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(p) for p in (data_files or [example_dataset_path()])]
    tokenizer = build_tokenizer(files)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_adapter(base: str | Path, out_dir: str | Path, *, seed: int = 1, r: int = 4) -> Path:
    """Write a LoRA adapter on all linear layers of the model in `base`, with random (not zero) B so that it visibly
    changes the answers, and the base's tokenizer beside it, as a run's `adapter/` folder holds them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=4 * r, target_modules="all-linear", task_type="CAUSAL_LM",
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m payload.tinymodel", description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--data", action="append", help="JSONL file(s) to build the vocabulary from")
    args = ap.parse_args(argv)
    path = build_tiny_model(args.out_dir, args.data)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
