"""A local stand-in for the Azure services tuneops uses, served over TLS so the real azure-* SDK clients talk to it.

It implements what the code calls, with the REST shapes the SDKs send and expect: ARM Container Apps (managed
environments and their storages, jobs with start/executions/stop, container apps with revision restart, long-running
operations), Key Vault secrets (with the 401 challenge handshake), Azure Files (share, directory, file create, put
range, list, get with ranges, properties, delete) and the Log Analytics query API (a small KQL subset, failing loudly
on anything else). Faults can be injected: an HTTP status with Retry-After, a slow answer, an execution that ends
Failed or Degraded, a replica timeout. A started execution runs a "container program" against the share's folder,
which stands in for the GPU container that mounts the share at /mount.
"""

from jobs.backends.aca.standin.common import (
    ACCOUNT,
    ACCOUNT_KEY,
    SUBSCRIPTION,
    TENANT,
    WORKSPACE_ID,
    Fault,
    RecordedRequest,
)
from jobs.backends.aca.standin.kql import KqlError, _tokens, run_kql
from jobs.backends.aca.standin.programs import (
    ContainerContext,
    ExecutionPlan,
    Program,
    dies_at_once,
    run_command,
    simulated_trainer,
    sleeper,
)
from jobs.backends.aca.standin.server import (
    AzureStandIn,
    StaticTokenCredential,
    standin_config,
)

__all__ = ["ACCOUNT", "ACCOUNT_KEY", "SUBSCRIPTION", "TENANT", "WORKSPACE_ID", "AzureStandIn", "ContainerContext",
           "ExecutionPlan", "Fault", "KqlError", "Program", "RecordedRequest", "StaticTokenCredential", "dies_at_once",
           "run_command", "run_kql", "simulated_trainer", "sleeper", "standin_config", "_tokens"]
