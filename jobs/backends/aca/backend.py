"""The Azure Container Apps backend whole: AcaExecutor runs the trainer as ACA job executions; this adds what the bot
and the deploys ask of it: Key Vault secrets, Log Analytics logs, portal links, doctor checks (the GPU quota among
them), the smoke check, and the provisioning and deploy operations (RQ jobs of `jobs.backends.aca.ops`, reported as
RunEvents of their op id).

Each method is quick: a Key Vault write or list, a Log Analytics query, or enqueuing an op. A secret's value goes to
Key Vault in `set_secret` and nowhere else; ops get only the secret's name.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from jobs.backends.aca import endpoints, ops, profiles, secrets, smoke
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.executor import AcaExecutor
from jobs.backends.aca.logs import run_logs
from jobs.backends.aca.provision import get_job
from jobs.backends.aca.quota import read_gpu_quota
from jobs.backends.aca.resources import InvalidSecretName, secret_name
from jobs.backends.aca.sync import HashCache, default_cache_path, sync_workspace
from jobs.backends.protocol import (
    Check,
    DeployStarted,
    LogsAnswer,
    SecretInfo,
    SmokeResult,
    SmokeStep,
)
from jobs.core import store
from jobs.core.cost import GpuProfile
from jobs.core.domain import Run
from jobs.core.endpoints import ManifestDamaged
from jobs.core.errors import BackendError, Hint


def _billed(profile_type: str) -> GpuProfile:
    """A workload profile type as the cost arithmetic sees it: its name, GPUs a replica and GPU model."""
    p = profiles.profile(profile_type)
    return GpuProfile(p.type_name, max(p.gpu_count, 1), p.gpu_model or "cpu")


class AcaBackend(AcaExecutor):
    # Logs ---------------------------------------------------------------------------------------------------------

    def run_logs(self, run: Run, tail: int, grep: str | None) -> LogsAnswer:
        return run_logs(self.clients, run, tail=tail, grep=grep)

    # Deploys ------------------------------------------------------------------------------------------------------

    def describe_target(self) -> str:
        name = self.cfg.app_name or "(ACA_APP_NAME not set)"
        return f"the ACA inference app {name}" + (f" at {self.cfg.app_endpoint}" if self.cfg.app_endpoint else "")

    def gpu_profile(self) -> GpuProfile:
        return _billed(self.cfg.workload_profile_type)

    def deploy(self, run: Run, approval_id: str, requester: str) -> DeployStarted:
        return DeployStarted(op_id=ops.enqueue_deploy_op(self.settings, run.id, requester, run.channel))

    def deploy_endpoint(self) -> str:
        return self.cfg.app_endpoint

    def undeploy(self, run: Run) -> bool:
        """Out of the base model's manifest on the share: the replicas unload it within seconds. The app is not
        stopped: with min replicas 0 it costs nothing once idle, and a later deploy finds it ready."""
        try:
            endpoints.remove_adapter(self.clients, store.connect(self.settings), run)
        except ManifestDamaged as e:
            raise BackendError(str(e)) from None
        return False

    def requests_served(self, model: str) -> dict[str, int]:
        return endpoints.served_counts(self.clients, model)

    def inference_usage(self) -> tuple[GpuProfile, list[list[float]]]:
        return _billed(self.cfg.app_workload_profile_type), endpoints.uptime(self.clients)

    # Doctor -------------------------------------------------------------------------------------------------------

    def doctor(self) -> list[Check]:
        """The config files, the job, the GPU quota, the share, Key Vault, Log Analytics. Read-only and quick."""
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

        def gpu_quota():
            q = read_gpu_quota(self.clients, job=get_job(self.clients))
            if not q.ok:
                raise BackendError(q.line())
            return q.line()

        check("ACA job", job)
        check("GPU quota", gpu_quota)
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

    def smoke_check(self, report: Callable[[SmokeStep], None], log_wait_s: float | None = None) -> SmokeResult:
        """One short CPU execution of `<job>-smoke` that proves the share, the Key Vault references, the payload
        import and the logs (jobs.backends.aca.smoke), here and now (`tuneops doctor --smoke`). It waits for a
        smoke check that a worker runs (each check sets its id on the job); without a Redis, it goes unlocked."""
        lock = None
        try:
            lock = store.connect(self.settings).lock(ops.lock_name("smoke", self.clients), timeout=ops.LOCK_TTL_S,
                                                     blocking_timeout=ops.LOCK_WAIT_S)
            if not lock.acquire():
                raise BackendError("Another smoke check has been running for too long; try again later.",
                                   transient=True)
        except redis.exceptions.ConnectionError:
            lock = None
        try:
            return smoke.run_smoke(self.clients, report, sync=self._sync_quietly, log_wait_s=log_wait_s)
        finally:
            if lock is not None:
                try:
                    lock.release()
                except redis.exceptions.RedisError:
                    pass  # expired, or Redis went away: the next check takes it anew

    def _sync_quietly(self, sources):
        """The executor's sync; without a Redis to serialize syncs (a laptop running the doctor), unlocked."""
        try:
            return self.sync(sources)
        except redis.exceptions.ConnectionError:
            with azure_call("sync the payload code to the Azure Files share"):
                return sync_workspace(self.clients.share, sources, concurrency=self.clients.upload_concurrency,
                                      cache=HashCache(default_cache_path()))
