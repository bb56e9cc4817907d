"""The one secret-masking rule set of tuneops, used by the bot and by jobs: which variables hold secrets, how short a
known value may be, and the secret-shaped patterns. `Redactor` masks known values and patterns (the bot passes every
text to Slack through one, bot.redact); `mask`/`mask_lines` mask known values only (jobs, before trainer output
reaches Redis: the worker's own secrets, and the backend's, e.g. Key Vault values).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

log = logging.getLogger(__name__)

MASK = "***"

# Shorter known values would blank ordinary words ("admin", "test") everywhere; they are left to the patterns.
MIN_KNOWN_LEN = 8

# Environment variables whose values are secrets, by name; plus any name with one of SECRET_SUFFIXES.
SECRET_ENV_VARS = (
    "SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN", "SLACK_CLIENT_SECRET", "SLACK_USER_TOKEN",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET", "TUNEOPS_SERVE_API_KEY", "OPENAI_API_KEY",
)
SECRET_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_API_KEY", "_ACCESS_KEY", "_ACCOUNT_KEY", "_STORAGE_KEY",
                   "_CONNECTION_STRING", "_SAS", "_SAS_TOKEN")

# Each pattern either masks its whole match, or (when it has a group named "v") only that group, so that the
# reader still sees what was there ("AccountKey=***", "Bearer ***"). None of them matches "*", so a mask is
# never matched again.
_B64 = r"A-Za-z0-9+/="
# (triggers, pattern): a pattern is only run on text that holds one of its triggers (lower case), which keeps the
# common case - a log line with no secret in it - cheap.
_RULES: tuple[tuple[tuple[str, ...] | None, re.Pattern[str]], ...] = (
    # Hugging Face tokens: hf_ + 34 letters/digits (older ones are a little shorter).
    (("hf_",), re.compile(r"hf_[A-Za-z0-9]{30,}")),
    # Slack tokens: bot, user, app-level, refresh, config.
    (("xox",), re.compile(r"xox[abeprs]-[A-Za-z0-9][A-Za-z0-9-]{8,}")),
    (("xapp-",), re.compile(r"xapp-[A-Za-z0-9][A-Za-z0-9-]{8,}")),
    # Azure connection strings (case does not matter to Azure either).
    (("key",), re.compile(r"(?i)(?:Account|SharedAccess)Key\s*=\s*(?P<v>[^;\s\"'&<>,*]+)")),
    # The signature of a SAS URL or token; the rest of a SAS (sv=, se=, sp=) is not secret.
    (("sig=",), re.compile(r"(?i)sig=(?P<v>[A-Za-z0-9%+/=_-]+)")),
    # A bearer token: must hold a digit or a symbol, or be long, so that "bearer responsibilities" stays prose.
    (("bearer",),
     re.compile(r"(?i)bearer\s+(?P<v>(?=[A-Za-z.]*[0-9_~+/=-])[A-Za-z0-9._~+/=-]{8,}|[A-Za-z0-9._~+/=-]{20,})")),
    # W&B API keys are 40 hex digits. A run of 40 or more also catches a key glued to other hex digits; the cost is
    # that full git commit ids and sha256 digests are masked too (short ids like 3f2a9c1 are not).
    (None, re.compile(r"[0-9a-fA-F]{40,}")),
    # NAME_TOKEN=value, NAME_SECRET: value ... as printed by env dumps and config echoes.
    (("token", "secret", "passw", "api_key", "access_key", "account_key"),
     re.compile(r"\b[A-Z][A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|ACCOUNT_KEY)\b[\"']?\s*[=:]\s*"
                r"[\"']?(?P<v>[^\s\"'*,;&<>]{5,}[^\s\"'*,;&<>.])")),
    # "access_token": "...", "password": "..." in JSON bodies.
    (("token", "secret", "password", "api_key", "apikey"),
     re.compile(r"(?i)\"(?:access_token|refresh_token|id_token|client_secret|api_key|apikey|password|secret|token)\""
                r"\s*:\s*\"(?P<v>[^\"*]{6,})\"")),
    # Passwords in URLs: scheme://user:password@host
    (("://",), re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@*]*:(?P<v>[^\s/@*]{3,})@")),
    # The secret form's submission (bot.secretform.VALUE_BLOCK): a raw request body that reaches a log (Bolt logs one
    # whose signature does not match) is masked from that block to the end, in whatever encoding the body has.
    (("tuneops_secret_value",), re.compile(r"(?<=tuneops_secret_value)(?P<v>.+)", re.S)),
    # PEM private keys, whole blocks; a block cut off before its END line is masked to the end of the text.
    (("private key-----",),
     re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)", re.S)),
)
PATTERNS: tuple[re.Pattern[str], ...] = tuple(p for _, p in _RULES)
# The tail of a key whose BEGIN line went into an earlier message: its END line and the base64 lines above it.
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
_PEM_BODY_LINE = re.compile(rf"^\s*[{_B64}]*\s*$|^(?:Proc-Type|DEK-Info):.*$")

_MAX_PASSES = 64


def _variants(value: str) -> set[str]:
    """The forms a secret takes in text: as is, trimmed, URL-encoded, JSON-escaped, HTML-escaped."""
    out = {value, value.strip()}
    for v in list(out):
        out.add(quote(v, safe=""))
        out.add(quote(v, safe="/"))
        out.add(json.dumps(v)[1:-1])
        out.add(json.dumps(v, ensure_ascii=False)[1:-1])
        out.add(html.escape(v, quote=False))
    return {v for v in out if len(v) >= MIN_KNOWN_LEN}


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of half-open intervals, so that overlapping or touching secrets become one mask."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _pem_tail_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _PEM_END.finditer(text):
        start = text.rfind("\n", 0, m.start()) + 1
        # Walk up over lines that look like key material (base64, or "Proc-Type:"-style headers).
        while start > 0:
            prev = text.rfind("\n", 0, start - 1) + 1
            if not _PEM_BODY_LINE.match(text[prev:start - 1]):
                break
            start = prev
        spans.append((start, m.end()))
    return spans


def secret_values_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The secret values in an environment, by variable name (pure)."""
    found: dict[str, str] = {}
    for name, value in env.items():
        if not value:
            continue
        upper = name.upper()
        if upper in SECRET_ENV_VARS or upper.endswith(SECRET_SUFFIXES):
            found[name] = value
            # The key inside a connection string, and the signature inside a SAS, are secrets on their own.
            for part in re.split(r"[;&?]", value):
                key, sep, val = part.partition("=")
                if sep and key.strip().lower() in ("accountkey", "sharedaccesskey", "sharedaccesssignature", "sig"):
                    found[f"{name}:{key.strip()}"] = unquote(val.strip())
        elif upper.endswith("_URL") and "@" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            if password:
                found[f"{name}:password"] = unquote(password)
    return found


class Redactor:
    """Masks known secret values and secret-shaped text. Pure given its set of known values."""

    def __init__(self, known: Iterable[str] = ()):
        self._known: frozenset[str] = frozenset()
        self._literal: re.Pattern[str] | None = None
        self._warned_short = False
        for value in known:
            self.add(value)

    def add(self, value: str, name: str | None = None) -> None:
        """Remember a secret value (any value the bot reads that must never reach Slack)."""
        if not isinstance(value, str) or not value.strip():
            return
        if len(value.strip()) < MIN_KNOWN_LEN:
            if not self._warned_short:
                self._warned_short = True
                log.warning("a secret%s is shorter than %d characters: it is not masked as a literal (it would mask "
                            "ordinary words), only where it matches a secret pattern",
                            f" ({name})" if name else "", MIN_KNOWN_LEN)
            return
        new = self._known | _variants(value)
        if new == self._known:
            return
        # Longest first, so that at each position the longest known value is the one found.
        alternation = "|".join(re.escape(v) for v in sorted(new, key=len, reverse=True))
        # A lookahead finds overlapping occurrences too; their spans are merged afterwards.
        self._known, self._literal = frozenset(new), re.compile(f"(?=({alternation}))")

    def add_env(self, env: Mapping[str, str] = os.environ) -> None:
        for name, value in secret_values_from_env(env).items():
            self.add(value, name=name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Redactor:
        """A Redactor that knows the secret values of `env` (Slack tokens, storage keys, HF_TOKEN, ...)."""
        r = cls()
        r.add_env(env)
        return r

    @property
    def known_count(self) -> int:
        return len(self._known)

    def _spans(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        literal = self._literal
        if literal is not None:
            spans.extend((m.start(), m.start() + len(m.group(1))) for m in literal.finditer(text))
        low = text.lower()
        for triggers, pattern in _RULES:
            if triggers is not None and not any(t in low for t in triggers):
                continue
            for m in pattern.finditer(text):
                if "v" in pattern.groupindex and m.group("v") is not None:
                    spans.append(m.span("v"))
                else:
                    spans.append(m.span())
        if "PRIVATE KEY-----" in text:
            spans.extend(_pem_tail_spans(text))
        return [s for s in spans if s[1] > s[0]]

    def _once(self, text: str) -> str:
        spans = _merge(self._spans(text))
        if not spans:
            return text
        parts, pos = [], 0
        for start, end in spans:
            parts.append(text[pos:start])
            parts.append(MASK)
            pos = end
        parts.append(text[pos:])
        return "".join(parts)

    def __call__(self, text: str) -> str:
        if not isinstance(text, str) or not text:
            return text
        # A mask can join the text around it into a new match (a known value that holds "***", a pattern cut in
        # two by a known value); repeat until nothing changes. Every pass that changes the text shortens the
        # literal matches or removes pattern matches, so this ends quickly.
        for _ in range(_MAX_PASSES):
            out = self._once(text)
            if out == text:
                return out
            text = out
        return text

    def redact_obj(self, obj: Any) -> Any:
        """The same over every string value in nested dicts, lists and tuples (Block Kit payloads); keys are kept.

        Returns a new object; the input is not changed.
        """
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, Mapping):
            return {k: self.redact_obj(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.redact_obj(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.redact_obj(v) for v in obj)
        return obj




def secret_values(env: Mapping[str, str]) -> tuple[str, ...]:
    """The known secret values of an environment (by the rules above), longest first, so no secret is half-masked;
    values shorter than MIN_KNOWN_LEN are left to the patterns."""
    values = {v for v in secret_values_from_env(env).values() if len(v) >= MIN_KNOWN_LEN}
    return tuple(sorted(values, key=len, reverse=True))


def environment_secrets() -> tuple[str, ...]:
    return secret_values(os.environ)


def mask(text: str, secrets: Iterable[str]) -> str:
    """Known values only (cheap): what jobs does to trainer output before it reaches Redis."""
    for value in secrets:
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_lines(lines: Iterable[str], secrets: Iterable[str]) -> list[str]:
    secrets = tuple(secrets)
    return [mask(line, secrets) for line in lines]
