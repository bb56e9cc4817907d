"""Whether transformers can use the installed torch at all.

transformers 5 disables a torch older than it supports with one log line; every model class then fails with a message
that does not say why. The trainer and the server ask first and say it in one line.
"""

from __future__ import annotations


def torch_problem() -> str | None:
    """None when transformers can use the installed torch; else what is wrong and what to do, in one line."""
    import torch
    import transformers
    from transformers.utils import is_torch_available

    if is_torch_available():
        return None
    return (f"transformers {transformers.__version__} cannot use torch {torch.__version__}, which is older than it "
            "supports: use an image with torch 2.6 or later (IMAGE in infra/finetuning.config.json, e.g. the payload "
            "image built from the Dockerfile), or upgrade torch")
