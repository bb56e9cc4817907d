"""What the bot calls for the Azure backend. Each function takes the jobs settings and is quick: a Key Vault write or
list, a Log Analytics query, or enqueuing an RQ job whose progress arrives as RunEvents (run_id = the op id).

Secrets: the modal handler calls `set_secret` (the value goes to Key Vault and nowhere else), then
`enqueue_secret_reference` with the name only. Authorization (TUNEOPS_ADMINS) is checked by the bot before either.
"""

from __future__ import annotations

from jobs.aca import ops
from jobs.aca.logs import LogsAnswer
from jobs.aca.secrets import SecretInfo
from jobs.domain import Run


def set_secret(settings, name: str, value: str) -> SecretInfo:
    """Write the secret for env var `name` (HF_TOKEN -> Key Vault `hf-token`). Raises BackendError with a message
    for the user (a bad name, an empty value, a missing role), which never contains the value."""
    from jobs.aca import secrets

    return secrets.set_secret(ops.clients_for(settings), name, value)


def list_secrets(settings) -> list[SecretInfo]:
    """Names and dates of the vault's secrets (`SecretInfo.describe()` gives a line); values are never read."""
    from jobs.aca import secrets

    return secrets.list_secrets(ops.clients_for(settings))


def enqueue_secret_reference(settings, name: str, requester: str, channel: str) -> str:
    """Queue making the job (and the inference app) reference the secret; returns the op id."""
    return ops.enqueue_secret_reference(settings, name, requester, channel)


def enqueue_provision(settings, kind: str, requester: str, channel: str) -> str:
    """Queue `/finetune provision finetune|inference`; returns the op id (pv-0001)."""
    return ops.enqueue_provision(settings, kind, requester, channel)


def enqueue_deploy(settings, run_id: str, requester: str, channel: str) -> str:
    """Queue deploying a succeeded run's adapter to the inference app (after the approver's click)."""
    return ops.enqueue_deploy(settings, run_id, requester, channel)


def get_op(settings, op_id: str) -> ops.Op | None:
    from jobs import store

    return ops.get_op(store.connect(settings), op_id)


def set_op_thread(settings, op_id: str, thread_ts: str) -> None:
    ops.set_op_thread(settings, op_id, thread_ts)


def run_logs(settings, run: Run, tail: int = 50, grep: str | None = None) -> LogsAnswer:
    """`/finetune logs RUN [--tail N] [--grep TEXT]` for a run on the ACA backend."""
    from jobs.aca.logs import run_logs as query

    return query(ops.clients_for(settings), run, tail=tail, grep=grep)


def portal_links(settings, run: Run) -> dict[str, str]:
    """Links for the run's thread: the job, its executions, a Log Analytics query for the run. No network."""
    from jobs.aca.config import load_aca_config
    from jobs.aca.logs import portal_links as links

    return links(load_aca_config(workspace=getattr(settings, "workspace", None)), run)


def doctor(settings) -> list[tuple[str, bool, str]]:
    """Checks for `tuneops doctor` on the aca backend: (what, ok, detail or what to do). Read-only and quick."""
    from jobs.aca.config import load_aca_config
    from jobs.aca.provision import get_job
    from jobs.executor import BackendError

    out: list[tuple[str, bool, str]] = []
    try:
        cfg = load_aca_config(workspace=getattr(settings, "workspace", None))
    except BackendError as e:
        return [("Azure config (infra/finetuning.config.json)", False, str(e))]
    out.append(("Azure config", True, str(cfg.infra_dir)))
    clients = ops.clients_for(settings)

    def check(what: str, fn) -> None:
        try:
            out.append((what, True, fn() or "ok"))
        except BackendError as e:
            out.append((what, False, str(e)))
        except Exception as e:  # a credential or network failure the SDK did not classify
            out.append((what, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))

    def job():
        if get_job(clients) is None:
            raise BackendError(f"the ACA job {cfg.job_name} does not exist: run `/finetune provision finetune`")
        return cfg.job_name

    def share():
        from jobs.aca.errors import azure_call

        with azure_call("read the file share"):
            clients.share.get_share_properties()
        return cfg.file_share

    check("ACA job", job)
    check("Azure Files share", share)
    if cfg.key_vault_url:
        check("Key Vault", lambda: f"{len(list_secrets(settings))} secret(s)")
    else:
        out.append(("Key Vault", False, "KEY_VAULT_URL is not set: the job gets no HF_TOKEN / WANDB_API_KEY"))
    out.append(("Log Analytics", bool(cfg.log_analytics_workspace_id),
                "ok" if cfg.log_analytics_workspace_id else
                "LOG_ANALYTICS_WORKSPACE_ID is not set: `/finetune logs` reads train.log from the share"))
    return out
