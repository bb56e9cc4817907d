"""The secret form's submission: check it and ack at once (errors under the fields, or a "saving" view), write the
value to Key Vault (the backend's set_secret, off the event loop), then queue the job's reference update with the name
only, and show the outcome in the modal the admin is looking at.

The value lives in this handler's locals and the Key Vault request, nowhere else: it is never logged, posted, put in
Redis or passed to a job. The reference update is an op with its own thread in the channel the command came from:
a change to the shared job is the team's business (who set which secret when; never the value), and the thread is
where provisioning reports too.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.errors import SlackApiError

from bot import grammar, secretform, words
from bot.auth import Refusal, authorize
from bot.listeners.support import call, log_refusal
from bot.outage import REDIS, UNREACHABLE
from bot.runtime import BotRuntime, runtime_of
from jobs import backends
from jobs.backends import get_backend
from jobs.backends.protocol import SECRETS
from jobs.core.errors import BackendError

log = logging.getLogger(__name__)

OUR_FAULT = "an error on tuneops' side (logged, without the value)."


async def secret_submit(ack, body: dict[str, Any], view: dict[str, Any], context) -> None:
    rt = runtime_of(context)
    user = (body.get("user") or {}).get("id", "")
    form = secretform.read_form(view)
    refusal = authorize(grammar.SecretSet(form.name or "?"), user, form.channel, rt.settings.policy)
    if refusal is None and not backends.offers(rt.settings.jobs, SECRETS):
        refusal = Refusal(f"Secrets need TUNEOPS_BACKEND=aca; this bot runs the `{rt.settings.jobs.backend}` backend.")
    if refusal is not None:
        log_refusal("the secret form", user, form.channel, refusal.reason)
        await ack(response_action="update", view=rt.gateway.clean(secretform.refused_view(refusal.reason)))
        return
    errors = secretform.form_errors(form, get_backend(rt.settings.jobs))
    if errors:
        await ack(response_action="errors", errors=rt.gateway.clean(errors))
        return
    await ack(response_action="update", view=rt.gateway.clean(secretform.saving_view(form.name)))
    await save(rt, form, user, view.get("id", ""))


async def save(rt: BotRuntime, form: secretform.SecretForm, user: str, view_id: str) -> None:
    backend = get_backend(rt.settings.jobs)
    try:
        info = await call(backend.set_secret, form.name, form.value)
    except BackendError as e:  # its message says what to do and never holds the value
        log.warning("secret %s was not saved for %s: %s", form.name, user, e)
        await show(rt, view_id, form.channel, user, secretform.not_saved(form.name, words.refusal(e)))
        return
    except Exception as e:  # not the exception's text: it could quote the request
        log.error("secret %s was not saved for %s: %s in set_secret", form.name, user, type(e).__name__)
        await show(rt, view_id, form.channel, user, secretform.not_saved(form.name, OUR_FAULT))
        return
    log.info("secret %s saved to Key Vault as %s by %s", info.env_name, info.vault_name, user)
    try:
        op_id = await call(backend.enqueue_secret_reference, info.env_name, user, form.channel)
    except Exception as e:  # only the name went in, so the trace is safe to log
        if isinstance(e, UNREACHABLE):
            REDIS.failed(e, f"queueing the job's reference to {info.env_name} (it is in Key Vault)")
        else:
            log.exception("%s is in Key Vault, but queueing the job's reference to it failed", info.env_name)
        reason = words.refusal(e) if isinstance(e, BackendError) else "Redis or the queue failed (it is logged)"
        await show(rt, view_id, form.channel, user,
                   secretform.saved_without_reference(info.env_name, info.vault_name, reason))
        return
    await show(rt, view_id, form.channel, user, secretform.saved(info.env_name, info.vault_name, op_id, form.channel))


async def show(rt: BotRuntime, view_id: str, channel: str, user: str, outcome: secretform.Outcome) -> None:
    """The outcome in the modal; when the admin closed it meanwhile, privately in the channel instead."""
    view, fallback = outcome
    try:
        await rt.gateway.update_view(view_id, view)
        return
    except SlackApiError as e:
        log.info("could not update the secret form (%s); telling %s privately", e.response.get("error"), user)
    try:
        await rt.gateway.post_ephemeral(channel, user, fallback)
    except SlackApiError as e:
        log.warning("could not tell %s the outcome of the secret form: %s", user, e.response.get("error"))
