"""The bot's redaction step that every text to Slack passes (jobs.core.masking holds the rules): known secret values
and secret-shaped patterns become `***`. `redactor` is the process-wide instance the Slack gateway uses; whatever
secret the bot reads is `add`ed to it.
"""

from __future__ import annotations

from typing import Any

from jobs.core.masking import MASK, PATTERNS, Redactor, secret_values_from_env

__all__ = ["MASK", "PATTERNS", "Redactor", "redact", "redact_obj", "redactor", "secret_values_from_env"]

# The process-wide redactor: the Slack gateway passes everything through it; the bot `add`s what it reads.
redactor = Redactor.from_env()


def redact(text: str) -> str:
    return redactor(text)


def redact_obj(obj: Any) -> Any:
    return redactor.redact_obj(obj)
