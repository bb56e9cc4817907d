"""The Azure Container Apps backend whole: AcaExecutor runs the trainer as ACA job executions; this adds what the bot
and the deploys ask of it: Key Vault secrets, Log Analytics logs, portal links, doctor checks, and the provisioning
and deploy operations (RQ jobs of `jobs.backends.aca.ops`, reported as RunEvents of their op id).

Each method is quick: a Key Vault write or list, a Log Analytics query, or enqueuing an op. A secret's value goes to
Key Vault in `set_secret` and nowhere else; ops get only the secret's name.
"""

from __future__ import annotations

from jobs.backends.aca import ops, secrets
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.executor import AcaExecutor
from jobs.backends.aca.logs import run_logs
from jobs.backends.aca.provision import get_job
from jobs.backends.aca.resources import InvalidSecretName, secret_name
from jobs.backends.protocol import Check, DeployStarted, LogsAnswer, SecretInfo
from jobs.core.domain import Run
from jobs.core.errors import BackendError, Hint


class AcaBackend(AcaExecutor):
    # Logs ---------------------------------------------------------------------------------------------------------

    def run_logs(self, run: Run, tail: int, grep: str | None) -> LogsAnswer:
        return run_logs(self.clients, run, tail=tail, grep=grep)

    # Deploys ------------------------------------------------------------------------------------------------------

    def describe_target(self) -> str:
        name = self.cfg.app_name or "(ACA_APP_NAME not set)"
        return f"the ACA inference app {name}" + (f" at {self.cfg.app_endpoint}" if self.cfg.app_endpoint else "")

    def deploy(self, run: Run, approval_id: str, requester: str) -> DeployStarted:
        return DeployStarted(op_id=ops.enqueue_deploy_op(self.settings, run.id, requester, run.channel))

    def deploy_endpoint(self) -> str:
        return self.cfg.app_endpoint

    # Doctor -------------------------------------------------------------------------------------------------------

    def doctor(self) -> list[Check]:
        """The config files, the job, the share, Key Vault, Log Analytics. Read-only and quick."""
        cfg = self.cfg
        out = [Check("Azure config", True, str(cfg.infra_dir))]

        def check(what: str, fn) -> None:
            try:
                out.append(Check(what, True, fn() or "ok"))
            except BackendError as e:
                out.append(Check(what, False, e.reason, e.hint))
            except Exception as e:  # a credential or network failure the SDK did not classify
                out.append(Check(what, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))

        def job():
            if get_job(self.clients) is None:
                raise BackendError(f"the ACA job {cfg.job_name} does not exist", hint=Hint("provision finetune"))
            return cfg.job_name

        def share():
            with azure_call("read the file share"):
                self.clients.share.get_share_properties()
            return cfg.file_share

        check("ACA job", job)
        check("Azure Files share", share)
        if cfg.key_vault_url:
            check("Key Vault", lambda: f"{len(self.list_secrets())} secret(s)")
        else:
            out.append(Check("Key Vault", False, "KEY_VAULT_URL is not set: the job gets no HF_TOKEN / WANDB_API_KEY"))
        out.append(Check("Log Analytics", bool(cfg.log_analytics_workspace_id),
                         "ok" if cfg.log_analytics_workspace_id else
                         "LOG_ANALYTICS_WORKSPACE_ID is not set: run logs are read from train.log on the share"))
        return out

    # Secrets and provisioning -------------------------------------------------------------------------------------

    def check_secret_name(self, name: str) -> str:
        try:
            vault_name = secret_name(name)
        except InvalidSecretName as e:
            raise BackendError(f"{e}.") from None
        self.cfg.require("Storing secrets", "key_vault_url")
        return vault_name

    def check_secret(self, name: str, value: str) -> str:
        return secrets.check_secret(name, value)

    def set_secret(self, name: str, value: str) -> SecretInfo:
        """Write the secret for env var `name` (HF_TOKEN -> Key Vault `hf-token`). Raises BackendError with a message
        for the person (a bad name, an empty value, a missing role), which never contains the value."""
        return secrets.set_secret(self.clients, name, value)

    def list_secrets(self) -> list[SecretInfo]:
        return secrets.list_secrets(self.clients)

    def enqueue_secret_reference(self, name: str, requester: str, channel: str) -> str:
        return ops.enqueue_secret_reference(self.settings, name, requester, channel)

    def provision_targets(self, target: str | None) -> tuple[list[str], str]:
        return ops.provision_targets(target, bool(self.cfg.app_name))

    def enqueue_provision(self, kind: str, requester: str, channel: str) -> str:
        return ops.enqueue_provision(self.settings, kind, requester, channel)
