"""Checks a fine-tuning dataset before anything is queued: `python -m payload.validate data.jsonl [--tokenizer PATH]`.

`validate_dataset` is what the bot calls; it imports neither torch nor transformers unless a tokenizer is given
(without one, token counts are estimates).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from payload import data
from payload.modelpath import ModelNotFound, hub_failure, resolve_model


@dataclass
class ValidationReport:
    path: str
    format: str | None = None
    examples: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_seq_length: int = 1024
    exact_tokens: bool = False             # True: counted with the model's tokenizer; False: estimated
    token_stats: dict[str, float] = field(default_factory=dict)   # min, mean, p50, p95, max per example
    tokens_per_epoch: int = 0              # after cutting at max_seq_length
    trainable_tokens_per_epoch: int | None = None
    too_long: int = 0
    packed_sequences: int | None = None
    pack_fill: float | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """A few lines for people: the verdict, the figures, then every error and warning."""
        lines = []
        verdict = "OK" if self.ok else f"{len(self.errors)} problem{'s' if len(self.errors) != 1 else ''}"
        fmt = data.FORMAT_NAMES.get(self.format or "", "unknown format")
        lines.append(f"{self.path}: {verdict}: {self.examples} valid example{'s' if self.examples != 1 else ''}, {fmt}")
        if self.token_stats:
            how = "tokens" if self.exact_tokens else "tokens (estimated; pass a tokenizer for exact counts)"
            s = self.token_stats
            lines.append(f"  {how} per example: min {s['min']:.0f}, mean {s['mean']:.0f}, p50 {s['p50']:.0f}, "
                         f"p95 {s['p95']:.0f}, max {s['max']:.0f}")
            per_epoch = f"  tokens per epoch: {self.tokens_per_epoch:,}"
            if self.trainable_tokens_per_epoch is not None:
                per_epoch += f" ({self.trainable_tokens_per_epoch:,} of them trained on)"
            lines.append(per_epoch)
            if self.packed_sequences is not None:
                lines.append(f"  packed into {self.packed_sequences} sequences of up to {self.max_seq_length} tokens "
                             f"({self.pack_fill:.0%} full)")
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def load_tokenizer(path: str, workspace: str | Path | None = None):
    """A tokenizer from a folder (or model-cache/<id>, or the hub when allowed); ModelNotFound on failure."""
    ref, local = resolve_model(path, workspace, what="tokenizer")
    import os

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref, token=None if local else os.environ.get("HF_TOKEN") or None)
    except Exception as e:  # noqa: BLE001 - any loader failure is one line naming the tokenizer
        if not local:
            raise hub_failure(path, e, what="tokenizer") from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelNotFound(f"tokenizer '{path}': cannot load it: {first}") from None


def validate_dataset(path: str | Path, tokenizer_path: str | None = None, max_seq_length: int = 1024,
                     min_examples: int = data.MIN_EXAMPLES, workspace: str | Path | None = None) -> ValidationReport:
    """Check a JSONL dataset: every problem as `file:line: reason` in `.errors`, over-long examples as a warning."""
    result = data.read_records(path, min_examples=min_examples)
    report = ValidationReport(path=str(path), format=result.format, examples=len(result.records),
                              errors=list(result.errors), max_seq_length=max_seq_length)
    if not result.records:
        return report

    lengths: list[int]
    if tokenizer_path:
        try:
            tokenizer = load_tokenizer(tokenizer_path, workspace)
        except ModelNotFound as e:
            report.errors.append(str(e))
            return report
        if result.format == "messages" and data.ensure_chat_template(tokenizer):
            report.warnings.append("the tokenizer has no chat template; training will use a plain '### role:' one")
        # Tokenize without a cut to see the full lengths; the cut is applied below as training applies it.
        full = [data.tokenize_record(r, tokenizer, max_seq_length=10**9) for r in result.records]
        lengths = [len(e.input_ids) for e in full]
        cut = [data.TokenizedExample(e.input_ids[:max_seq_length], e.labels[:max_seq_length], e.line,
                                     len(e.input_ids)) for e in full]
        report.exact_tokens = True
        report.trainable_tokens_per_epoch = sum(e.trainable_tokens for e in cut)
        lost = [e.line for e in cut if e.trainable_tokens == 0]
        if lost:
            report.warnings.append(f"{len(lost)} examples keep no answer token within max_seq_length and will be left "
                                   f"out (lines {', '.join(map(str, lost[:10]))}{'...' if len(lost) > 10 else ''})")
        report.packed_sequences = len(data.pack([len(e.input_ids) for e in cut], max_seq_length))
        report.pack_fill = data.pack_fill(cut, max_seq_length)
    else:
        lengths = [data.estimate_tokens(r) for r in result.records]

    ordered = sorted(lengths)
    report.token_stats = {"min": ordered[0], "mean": sum(ordered) / len(ordered), "p50": _percentile(ordered, 0.5),
                          "p95": _percentile(ordered, 0.95), "max": ordered[-1]}
    report.tokens_per_epoch = sum(min(n, max_seq_length) for n in lengths)
    long_lines = [r.line for r, n in zip(result.records, lengths) if n > max_seq_length]
    report.too_long = len(long_lines)
    if long_lines:
        about = "" if report.exact_tokens else "about "
        report.warnings.append(
            f"{about}{len(long_lines)} examples are longer than max_seq_length ({max_seq_length} tokens) and will be "
            f"cut (lines {', '.join(map(str, long_lines[:10]))}{'...' if len(long_lines) > 10 else ''}); "
            "shorten them or raise max_seq_length")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m payload.validate", description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="JSONL file: messages, prompt/completion or text")
    ap.add_argument("--tokenizer", help="model or tokenizer folder for exact token counts")
    ap.add_argument("--max-seq-length", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.max_seq_length < 1:
        print("error: --max-seq-length must be at least 1", file=sys.stderr)
        return 2
    if args.tokenizer:
        import logging
        import os
        import warnings

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
    report = validate_dataset(args.dataset, args.tokenizer, args.max_seq_length)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
