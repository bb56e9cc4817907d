"""`/finetune secret set NAME` and `secret list` end to end: the bot over signed HTTP with the Slack stand-in, the
real Key Vault and ARM clients against the Azure stand-in, a real worker for the job's reference update. A canary
value proves where a secret goes: Key Vault, and nowhere else."""

from __future__ import annotations

import json
import logging
import zlib

import pytest
import redis
from rq.job import Job

from bot import secretform
from bot.redact import redact
from bot.standin.slack import signed_headers
from tests.bot.conftest import SIGNING_SECRET
from tests.bot.slack_azure import (  # noqa: F401  (fixtures)
    ADMIN,
    aca,
    aca_worker,
    bot_env,
    opened_view,
    standin,
    view_submission_body,
    worker_log,
)

pytestmark = pytest.mark.timeout(180)

# No redaction pattern matches this, so only the code's own care keeps it out of Slack, logs and Redis.
CANARY = "cAnArY.q7Lm.Zx42.secret.value"


def redis_dump(url: str) -> list[bytes]:
    """Every key and every value in Redis (SCAN over all keys, every type), with compressed RQ job data opened."""
    r = redis.Redis.from_url(url)
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            values = [r.get(key)]
        elif kind == b"hash":
            values = [x for kv in r.hgetall(key).items() for x in kv]
        elif kind == b"list":
            values = r.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(r.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values = [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
        else:
            raise AssertionError(f"unexpected Redis type {kind} of {key}")
        for v in values:
            if v is None:
                continue
            out.append(v)
            try:  # RQ keeps a job's function and arguments as a zlib-compressed pickle
                out.append(zlib.decompress(v))
            except zlib.error:
                pass
    r.close()
    return out


def rq_job_args(url: str) -> list[str]:
    r = redis.Redis.from_url(url)
    ids = [k.decode().split(":", 2)[2] for k in r.scan_iter("rq:job:*") if k.count(b":") == 2]
    out = [repr((job.func_name, job.args, job.kwargs)) for job in Job.fetch_many(ids, connection=r) if job]
    r.close()
    return out


async def open_form(bot, slack, text: str = "secret set HF_TOKEN", user: str = ADMIN):
    trigger = "1234.5678.abcdef"
    status, ack, key = await bot.command(text, user=user, trigger_id=trigger)
    assert status == 200
    call = await slack.until(lambda: next(iter(slack.calls_to("views.open")), None), 10)
    assert call is not None, (ack, slack.responses[key])
    assert call.ok and call.params["trigger_id"] == trigger
    return opened_view(call)


async def submit(bot, view_id, view, name: str, value: str, user: str = ADMIN) -> dict:
    body = view_submission_body(view, view_id, {secretform.NAME_BLOCK: {secretform.NAME_ACTION: name},
                                                secretform.VALUE_BLOCK: {secretform.VALUE_ACTION: value}},
                                user_id=user)
    status, text = await bot.post(body, signed_headers(SIGNING_SECRET, body))
    assert status == 200, text
    return json.loads(text) if text else {}


async def test_a_secret_set_through_the_modal_reaches_key_vault_and_the_job_and_nothing_else(
        bot, slack, aca, aca_worker, bot_env, caplog):
    caplog.set_level(logging.DEBUG)
    view_id, view = await open_form(bot, slack)
    # the form: the name filled in and editable, a plain text input for the value, nothing about a value yet
    inputs = {b["block_id"]: b["element"] for b in view["blocks"] if b["type"] == "input"}
    assert inputs[secretform.NAME_BLOCK]["initial_value"] == "HF_TOKEN"
    assert inputs[secretform.VALUE_BLOCK]["type"] == "plain_text_input"
    assert json.loads(view["private_metadata"]) == {"channel": "C0TRAIN"}

    ack = await submit(bot, view_id, view, "HF_TOKEN", CANARY)
    assert ack["response_action"] == "update" and "Saving HF_TOKEN" in json.dumps(ack["view"])

    # the modal ends saying where the value went and which op updates the job
    done = await slack.until(lambda: "saved in Key Vault" in json.dumps(slack.views.get(view_id)), 20)
    assert done, slack.views.get(view_id)
    final = json.dumps(slack.views[view_id])
    assert "`hf-token`" in final and "pv-0001" in final

    # Key Vault holds the value under the Key Vault name, tagged with the env var it feeds
    [version] = aca.standin.vault["hf-token"]
    assert version["value"] == CANARY and version["tags"] == {"tuneops-env": "HF_TOKEN"}

    # the op's thread in the channel reports the job's reference update, mentioning the admin
    root = await slack.until(lambda: next((m for m in slack.root_messages("C0TRAIN") if "pv-0001" in m.text), None),
                             60)
    assert root is not None, worker_log(aca_worker)
    assert "HF_TOKEN" in root.text
    said = await slack.until(lambda: [m for m in slack.thread("C0TRAIN", root.ts) if "is done" in m.text], 60)
    assert said, ([m.text for m in slack.thread("C0TRAIN", root.ts)], worker_log(aca_worker))
    assert said[0].text.startswith(f"<@{ADMIN}> pv-0001 is done")
    assert await slack.until(lambda: "done" in json.dumps(slack.messages["C0TRAIN"][root.ts].blocks), 10)

    # the job reads it through a Key Vault reference, exposed as HF_TOKEN
    job = aca.standin.jobs["tuneops-ft"]["properties"]
    [ref] = [s for s in job["configuration"]["secrets"] if s["name"] == "hf-token"]
    assert ref["keyVaultUrl"].startswith(aca.standin.vault_url) and ref["identity"].endswith("/tuneops-id")
    assert {"name": "HF_TOKEN", "secretRef": "hf-token"} in job["template"]["containers"][0]["env"]

    # ... and the value is nowhere else: Slack, Redis (every key, every value), RQ jobs, logs, ARM requests
    for call in slack.calls:
        assert CANARY not in json.dumps(call.params) + json.dumps(call.response), call.method
    assert not [v for v in redis_dump(bot_env["REDIS_URL"]) if CANARY.encode() in v]
    args = rq_job_args(bot_env["REDIS_URL"])
    assert any("run_op" in a for a in args) and not [a for a in args if CANARY in a]
    assert caplog.records and not [r for r in caplog.records if CANARY in r.getMessage()]
    assert "run_op('pv-0001')" in worker_log(aca_worker) and CANARY not in worker_log(aca_worker)
    to_azure = [r for r in aca.standin.requests if CANARY.encode() in r.body]
    assert [(r.service, r.method) for r in to_azure] == [("vault", "PUT")]


async def test_the_form_rejects_bad_input_in_place_and_stores_nothing(bot, slack, aca):
    view_id, view = await open_form(bot, slack)
    ack = await submit(bot, view_id, view, "9-lives", "")
    assert ack["response_action"] == "errors"
    assert set(ack["errors"]) == {secretform.NAME_BLOCK, secretform.VALUE_BLOCK}
    assert "HF_TOKEN" in ack["errors"][secretform.NAME_BLOCK]

    ack = await submit(bot, view_id, view, "HF_TOKEN", f"  {CANARY}\n")
    assert ack["response_action"] == "errors" and list(ack["errors"]) == [secretform.VALUE_BLOCK]
    assert "spaces" in ack["errors"][secretform.VALUE_BLOCK] and CANARY not in json.dumps(ack)

    ack = await submit(bot, view_id, view, "HF_TOKEN", "x" * 26 * 1024)
    assert ack["response_action"] == "errors" and "25 KB" in ack["errors"][secretform.VALUE_BLOCK]
    assert aca.standin.vault == {} and not aca.standin.requests_to("vault", "PUT")

    # a name Key Vault cannot take is refused at the command, before anyone types a value
    slack.calls.clear()
    status, ack_text, key = await bot.command("secret set HF-TOKEN")
    assert status == 200 and "not a valid secret name" in ack_text and "HF_TOKEN" in ack_text
    assert not slack.calls_to("views.open")


async def test_only_admins_may_set_or_list_secrets(bot, slack, aca):
    status, ack, _ = await bot.command("secret set HF_TOKEN", user="U0BOB")
    assert status == 200 and "for tuneops admins only" in ack and "<@U0ALICE>" in ack
    status, ack, _ = await bot.command("secret list", user="U0BOB")
    assert "for tuneops admins only" in ack
    assert not slack.calls_to("views.open")

    # a form opened by an admin and submitted by someone else (a forwarded view) is refused too
    view_id, view = await open_form(bot, slack)
    ack = await submit(bot, view_id, view, "HF_TOKEN", CANARY, user="U0BOB")
    assert ack["response_action"] == "update" and "admins only" in json.dumps(ack["view"])
    assert aca.standin.vault == {}


async def test_secret_list_shows_names_and_dates_never_values(bot, slack, aca, bot_env):
    from jobs.backends import get_backend
    from jobs.core.settings import JobSettings

    backend = get_backend(JobSettings.from_env(bot_env))
    backend.set_secret("HF_TOKEN", CANARY)
    backend.set_secret("WANDB_API_KEY", CANARY + ".w")
    status, ack, key = await bot.command("secret list")
    assert status == 200
    [answer] = await slack.until(lambda: slack.responses[key], 20)
    text = json.dumps(answer)
    assert answer["response_type"] == "ephemeral"
    assert "HF_TOKEN (Key Vault: hf-token), updated 20" in text and "WANDB_API_KEY (Key Vault: wandb-api-key)" in text
    assert CANARY not in text


def test_a_logged_submission_body_loses_the_value_to_redaction():
    """Bolt logs a request's raw body when its signature does not match (a rotated signing secret): the secret
    form's value must not survive the log redaction the CLI installs, in any of the forms a body takes."""
    view = secretform.secret_modal("HF_TOKEN", "C0TRAIN")
    raw = view_submission_body(view, "V1", {secretform.NAME_BLOCK: {"name": "HF_TOKEN"},
                                            secretform.VALUE_BLOCK: {"value": CANARY}})
    from urllib.parse import parse_qs

    as_json = parse_qs(raw)["payload"][0]
    as_dict = repr(json.loads(as_json))
    for text in (raw, as_json, as_dict):
        assert CANARY in text
        masked = redact(f"Invalid request signature detected (signature: v0=1, timestamp: 1, body: {text})")
        assert CANARY not in masked and secretform.VALUE_BLOCK in masked
    from bot.redact import redact_obj

    assert redact_obj(view) == view  # the form itself, sent through the gateway, keeps its block ids
    form = secretform.read_form(json.loads(as_json)["view"])
    assert form.name == "HF_TOKEN" and form.value == CANARY and CANARY not in repr(form)
