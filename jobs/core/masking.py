"""Known secret values masked out of trainer output (log lines, error messages) before jobs/ stores it in Redis.

The trainer runs with the worker's environment, so a secret it might print (an HF token in a traceback) is one of the
worker's own variables. Only exact known values are masked here; the bot's redaction of everything sent to Slack
also catches secret-shaped patterns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

MASK = "***"
# Shorter values would blank ordinary words in every line.
MIN_LEN = 8
SECRET_NAME_PARTS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "ACCESS_KEY", "ACCOUNT_KEY", "STORAGE_KEY",
                     "CONNECTION_STRING", "SAS")


def secret_values(env: Mapping[str, str]) -> tuple[str, ...]:
    """Values of variables whose names say they are secrets, longest first (so no secret is half-masked)."""
    values = {v for k, v in env.items() if any(p in k.upper() for p in SECRET_NAME_PARTS) and len(v) >= MIN_LEN}
    return tuple(sorted(values, key=len, reverse=True))


def mask(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_lines(lines: Iterable[str], secrets: Iterable[str]) -> list[str]:
    secrets = tuple(secrets)
    return [mask(line, secrets) for line in lines]


def environment_secrets() -> tuple[str, ...]:
    return secret_values(os.environ)
