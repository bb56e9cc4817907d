"""Redaction: known values and secret-shaped text never survive, wherever they sit; ordinary text is left alone."""

from __future__ import annotations

import base64
import copy
import json
import logging
import string
from urllib.parse import quote

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from bot.redact import MASK, Redactor, redact, redactor, secret_values_from_env

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALNUM = string.ascii_letters + string.digits
HEX = "0123456789abcdef"

# Arbitrary surrounding text: any printable character, including the punctuation secrets sit next to in URLs,
# JSON, code blocks and Slack mrkdwn.
surrounding = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
# Known values are at least 8 characters once trimmed (shorter ones are not literals, tested apart).
known_secret = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=8,
                       max_size=60).filter(lambda s: len(s.strip()) >= 8)


def _b64(n_bytes: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=n_bytes, max_size=n_bytes).map(lambda b: base64.b64encode(b).decode())


hf_token = st.text(ALNUM, min_size=34, max_size=34).map(lambda s: "hf_" + s)
slack_token = st.builds(
    lambda kind, a, b, c: f"xox{kind}-{a}-{b}-{c}",
    st.sampled_from("abpr"), st.text(string.digits, min_size=10, max_size=13),
    st.text(string.digits, min_size=10, max_size=13), st.text(ALNUM, min_size=24, max_size=24))
app_token = st.builds(lambda a, b, c: f"xapp-1-A{a}-{b}-{c}", st.text(ALNUM, min_size=10, max_size=10),
                      st.text(string.digits, min_size=13, max_size=13), st.text(HEX, min_size=64, max_size=64))
wandb_key = st.text(HEX, min_size=40, max_size=40)
jwt = st.builds(lambda a, b, c: f"eyJ{a}.eyJ{b}.{c}", st.text(ALNUM + "-_", min_size=10, max_size=30),
                st.text(ALNUM + "-_", min_size=10, max_size=60), st.text(ALNUM + "-_", min_size=20, max_size=43))


# Each shape: (the secret, the text it sits in as it is usually printed).
def _shapes(draw) -> tuple[str, str]:
    kind = draw(st.sampled_from(["hf", "slack", "app", "wandb", "account_key", "sas", "bearer", "pem"]))
    if kind == "hf":
        s = draw(hf_token)
        return s, draw(st.sampled_from(["{}", "HF_TOKEN={}", "token: {}", '{{"token": "{}"}}'])).format(s)
    if kind == "slack":
        s = draw(slack_token)
        return s, draw(st.sampled_from(["{}", "SLACK_BOT_TOKEN={}", "`{}`"])).format(s)
    if kind == "app":
        s = draw(app_token)
        return s, s
    if kind == "wandb":
        s = draw(wandb_key)
        return s, draw(st.sampled_from(["{}", "wandb login {}", "WANDB_API_KEY={}"])).format(s)
    if kind == "account_key":
        s = draw(_b64(64))
        return s, ("DefaultEndpointsProtocol=https;AccountName=tuneops;"
                   f"AccountKey={s};EndpointSuffix=core.windows.net")
    if kind == "sas":
        s = quote(draw(_b64(32)), safe="")
        return s, f"https://acct.file.core.windows.net/share/f.txt?sv=2022-11-02&sp=r&se=2030-01-01&sig={s}"
    if kind == "bearer":
        s = draw(jwt)
        return s, draw(st.sampled_from(["Authorization: Bearer {}", "-H 'authorization: bearer {}'"])).format(s)
    body = draw(_b64(90))
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return body[:64], f"-----BEGIN RSA PRIVATE KEY-----\n{lines}\n-----END RSA PRIVATE KEY-----"


pattern_secret = st.composite(_shapes)()


@SETTINGS
@given(secret=known_secret, before=surrounding, after=surrounding, repeat=st.integers(1, 3))
@example(secret="abcdefgh", before="xx", after="yy", repeat=2)
@example(secret="a***b***", before="a***", after="***", repeat=2)
def test_known_value_never_survives(secret, before, after, repeat):
    r = Redactor([secret])
    out = r(before + (secret + after) * repeat)
    assert secret not in out
    assert MASK in out


@SETTINGS
@given(secret=pattern_secret, before=surrounding, after=surrounding)
def test_pattern_shaped_secret_never_survives_without_being_known(secret, before, after):
    value, shaped = secret
    out = Redactor()(before + shaped + after)
    assert value not in out
    assert MASK in out


@SETTINGS
@given(secret=known_secret, wrapper=st.sampled_from(["json", "url", "code", "mrkdwn-link", "html"]),
       before=surrounding, after=surrounding)
def test_known_value_in_encoded_forms(secret, wrapper, before, after):
    r = Redactor([secret])
    if wrapper == "json":
        text = json.dumps({"log": before + secret + after})
        encoded = json.dumps(secret)[1:-1]
    elif wrapper == "url":
        encoded = quote(secret, safe="")
        text = f"https://example.org/cb?state={encoded}&x={quote(after, safe='')}"
    elif wrapper == "code":
        encoded = secret
        text = f"```\n{before}{secret}\n{after}```"
    elif wrapper == "mrkdwn-link":
        encoded = secret
        text = f"<https://example.org/?k={secret}|link> {after}"
    else:
        encoded = secret.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        text = before.replace("&", "&amp;") + encoded + after.replace("&", "&amp;")
    out = r(text)
    assert encoded not in out
    assert secret not in out


@SETTINGS
@given(a=known_secret, b=known_secret, cut=st.integers(1, 7), before=surrounding, after=surrounding)
def test_overlapping_known_values(a, b, cut, before, after):
    # b starts with the last `cut` characters of a: the text holds both, overlapping.
    b = a[-cut:] + b
    r = Redactor([a, b])
    text = before + a + b[cut:] + after
    out = r(text)
    assert a not in out and b not in out


# Ordinary text: prose, run ids, short hex ids, numbers, paths, Slack mentions, URLs without credentials.
prose_token = st.one_of(
    st.sampled_from(["the", "loss", "went", "down", "after", "epoch", "responsibilities",
                     "token", "tokens", "secret", "password", "signature", "config", "AccountName", "hf_hub",
                     "xoxo", "sig", "key", "keys:", "ERROR", "Traceback", "deadbeef", "cafe", "step", "finished.",
                     "https://portal.azure.com/#view/jobs", "model-cache/tiny", "<@U012ABCDEF>", "ok,", "(3/10)",
                     "BEGIN", "PRIVATE", "KEY", "-----", "tokens/s", "lr=1e-4", "bf16", "r=64", "wandb"]),
    st.from_regex(r"ft-\d{4}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{7,12}", fullmatch=True),
    st.from_regex(r"[0-9]{1,6}(\.[0-9]{1,4})?", fullmatch=True),
    st.from_regex(r"[a-z]{1,12}", fullmatch=True),
)
prose = st.lists(prose_token, max_size=40).flatmap(
    lambda words: st.lists(st.sampled_from([" ", " ", " ", "\n", ", ", ". ", ": "]), min_size=len(words),
                           max_size=len(words)).map(lambda seps: "".join(w + s for w, s in zip(words, seps))))


@SETTINGS
@given(text=prose, secrets=st.lists(known_secret, max_size=3))
# "Bearer" is left out of the random words: "Bearer 3f2a9c1d" does look like a credential and is masked.
@example(text="Bearer responsibilities and bearer tokens: the secret config. Commit 3f2a9c1, run ft-0042.",
         secrets=[])
def test_text_without_secrets_passes_unchanged(text, secrets):
    r = Redactor(secrets)
    for s in secrets:
        assume(s.strip() not in text and quote(s.strip(), safe="") not in text)
        assume(json.dumps(s.strip())[1:-1] not in text and quote(s.strip(), safe="/") not in text)
        assume(s.strip().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") not in text)
    assert r(text) == text


@SETTINGS
@given(secret=pattern_secret, before=surrounding, after=surrounding)
def test_redaction_is_idempotent(secret, before, after):
    r = Redactor(["knownvalue-123"])
    once = r(before + secret[1] + after + " knownvalue-123")
    assert r(once) == once


def test_masks_keep_the_context_readable():
    r = Redactor()
    assert r("conn: AccountName=a;AccountKey=abc/def+ghi==;EndpointSuffix=x") == \
        "conn: AccountName=a;AccountKey=***;EndpointSuffix=x"
    assert r("curl -H 'Authorization: Bearer eyJ0eXAiOiJKV1Qi.eyJzdWIiOiIx.c2ln'") == \
        "curl -H 'Authorization: Bearer ***'"
    assert r("GET /f?sv=2022&sig=AbC%2Bd%3D&se=2030") == "GET /f?sv=2022&sig=***&se=2030"
    assert r("redis://:hunter2pw@cache:6380/0") == "redis://:***@cache:6380/0"
    assert r('{"access_token": "ya29.a0AfH6SMBx"}') == '{"access_token": "***"}'
    assert r("HF_TOKEN=hf_" + "a" * 34 + ".") == "HF_TOKEN=***."


def test_pem_block_and_a_cut_off_tail():
    key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----"
    out = Redactor()(f"before\n{key}\nafter")
    assert out == "before\n***\nafter"
    # A key split across two messages: the first half ends the text, the second starts the next one.
    head, tail = key[:60], key[60:]
    assert "MIIEvQIBADAN" not in Redactor()("log line\n" + head)
    out = Redactor()("BKcwggSjAgEAAoIBAQC7\n" + tail.split("\n", 1)[1] + "\nnext line")
    assert "BKcwggSj" not in out and "next line" in out


def test_short_known_values_are_not_literals_and_are_logged_once(caplog):
    r = Redactor()
    with caplog.at_level(logging.WARNING, logger="bot.redact"):
        r.add("admin")
        r.add("test1")
    assert r("admin ran test1") == "admin ran test1"
    warnings = [rec for rec in caplog.records if "shorter than" in rec.getMessage()]
    assert len(warnings) == 1
    assert "admin" not in warnings[0].getMessage()


def test_from_env_reads_secret_variables_and_their_parts():
    conn_key = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA=="
    env = {
        "SLACK_BOT_TOKEN": "xoxb-notmatchingthepattern",
        "SLACK_SIGNING_SECRET": "8f742231b10e8888abcd99yyyzzz85a5",
        "TUNEOPS_SERVE_API_KEY": "serve-key-0001",
        "MY_SERVICE_PASSWORD": "correct horse",
        "AZURE_STORAGE_CONNECTION_STRING": f"AccountName=a;AccountKey={conn_key};EndpointSuffix=core.windows.net",
        "REDIS_URL": "redis://default:r3dis-pass@cache:6379/0",
        "HOME": "/home/tuneops-user",
        "TUNEOPS_WORKSPACE": "/srv/workspace",
    }
    found = secret_values_from_env(env)
    assert set(found.values()) >= {env["SLACK_SIGNING_SECRET"], env["TUNEOPS_SERVE_API_KEY"], "correct horse",
                                   conn_key, "r3dis-pass"}
    assert "/home/tuneops-user" not in found.values() and "/srv/workspace" not in found.values()
    r = Redactor.from_env(env)
    text = ("sig secret 8f742231b10e8888abcd99yyyzzz85a5, key serve-key-0001, pw correct horse, "
            f"key {conn_key} redis r3dis-pass home /home/tuneops-user")
    out = r(text)
    for v in ("8f742231b10e8888abcd99yyyzzz85a5", "serve-key-0001", "correct horse", conn_key, "r3dis-pass"):
        assert v not in out
    assert "/home/tuneops-user" in out


def test_redact_obj_over_block_kit():
    token = "hf_" + "Q" * 34
    known = "s3cr3t-value-42"
    blocks = {
        "channel": "C123", "thread_ts": "1700000000.000100", "unfurl_links": False,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"```HF_TOKEN={token}```"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"value {known} here"}, {"type": "image"}]},
            {"type": "actions", "elements": [{"type": "button", "value": known, "action_id": "deploy",
                                              "text": {"type": "plain_text", "text": "Deploy"}}]},
            ("tuple", known, 3, None, 2.5),
        ],
    }
    before = copy.deepcopy(blocks)
    out = Redactor([known]).redact_obj(blocks)
    dumped = json.dumps(out)
    assert token not in dumped and known not in dumped
    assert blocks == before, "the input is not changed"
    assert out["blocks"][2]["elements"][0]["value"] == MASK
    assert out["blocks"][2]["elements"][0]["text"]["text"] == "Deploy"
    assert out["blocks"][3] == ("tuple", MASK, 3, None, 2.5)
    assert out["unfurl_links"] is False and out["channel"] == "C123"


def test_module_level_redactor_learns_what_the_bot_reads():
    value = "modal-entered-secret-9876"
    assert redact(f"x {value}") == f"x {value}"
    redactor.add(value)
    assert redact(f"x {value}") == f"x {MASK}"
