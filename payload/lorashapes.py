"""Whether a LoRA adapter's weights fit a base model, from shapes alone: no torch, no weights read.

The inference server checks an adapter against the linear layers of the model it has loaded; the ACA backend checks
it before a deploy, from the safetensors headers of the adapter and of the base in the model cache on the share
(a header is the first 8 bytes, a little-endian length, then that many bytes of JSON: each tensor's dtype, shape and
offsets; https://github.com/huggingface/safetensors#format). Importable without torch, for jobs/.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 2**20     # safetensors' own limit on a header


class HeaderError(ValueError):
    """Not a safetensors file (or a cut-short one)."""


def header_length(first_bytes: bytes) -> int:
    """The JSON header's length, from a safetensors file's first 8 bytes."""
    if len(first_bytes) < HEADER_LENGTH_BYTES:
        raise HeaderError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", first_bytes[:HEADER_LENGTH_BYTES])
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise HeaderError(f"a header length of {n} bytes is not a safetensors file's")
    return n


def header_shapes(header: bytes) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors file's JSON header."""
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderError(f"its header is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise HeaderError("its header is not a JSON object")
    return {name: tuple(int(x) for x in info["shape"]) for name, info in parsed.items()
            if name != "__metadata__" and isinstance(info, dict) and isinstance(info.get("shape"), list)}


def linear_layers(weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """A base model's layers that LoRA can adapt, name -> (in, out), from its weights' shapes: every 2-D `.weight`
    (a linear layer's weight is (out_features, in_features))."""
    return {name[:-len(".weight")]: (shape[1], shape[0]) for name, shape in weight_shapes.items()
            if name.endswith(".weight") and len(shape) == 2}


def adapter_mismatch(adapter_shapes: dict[str, tuple[int, ...]],
                     base_linears: dict[str, tuple[int, int]]) -> str | None:
    """Say why LoRA weights (key -> shape) do not fit a base's linear layers (name -> (in, out)); None when they do.

    lora_A is (r, in_features) and lora_B is (out_features, r) of the layer they adapt.
    """
    for key in sorted(adapter_shapes):
        m = LORA_KEY.match(key)
        if m is None:
            continue
        module, part = m["module"], m["part"]
        if module not in base_linears:
            return f"the adapter changes layer {module}, which the base model does not have"
        in_features, out_features = base_linears[module]
        shape = adapter_shapes[key]
        got, expected = (shape[1], in_features) if part == "A" else (shape[0], out_features)
        side = "inputs" if part == "A" else "outputs"
        if got != expected:
            return f"layer {module} has {expected} {side} in the base model but {got} in the adapter"
    return None


def shard_files(index: Any) -> list[str]:
    """The weight files a sharded model's `model.safetensors.index.json` names (its weight_map's values)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    return sorted({str(f) for f in weight_map.values()}) if isinstance(weight_map, dict) else []
