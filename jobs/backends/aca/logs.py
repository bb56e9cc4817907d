"""A run's logs from Log Analytics (KQL over the ACA console logs) and the portal links for its thread.

Ingestion into Log Analytics lags by minutes, so live progress comes from the share (see jobs.backends.aca.executor); this is
for the logs command and for the last words of a container that died before it wrote
anything. Both console-log schemas are queried at once: `ContainerAppConsoleLogs_CL` (an environment that logs to
Log Analytics) and `ContainerAppConsoleLogs` (one that logs through Azure Monitor).
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
from urllib.parse import quote

from jobs.backends.aca import share as sharefs
from jobs.backends.aca.config import AcaConfig
from jobs.backends.aca.errors import azure_call
from jobs.backends.aca.secrets import masks_for_job
from jobs.backends.logtext import grep_lines, split_log
from jobs.backends.protocol import LogsAnswer
from jobs.core.domain import Run
from jobs.core.errors import BackendError
from jobs.core.masking import mask_lines
from payload.events import PREFIX as EVENT_PREFIX

PORTAL = "https://portal.azure.com"
MAX_TAIL = 1000
MAX_GREP = 200


def kql_string(text: str) -> str:
    """A KQL string literal for any text: quotes, backslashes and control characters escaped."""
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def build_log_query(job_name: str, execution: str = "", *, tail: int = 50, grep: str = "") -> str:
    """KQL for the console lines of one job (one execution when given), last `tail` lines, oldest first. Pure."""
    if not 1 <= tail <= MAX_TAIL:
        raise ValueError(f"--tail must be between 1 and {MAX_TAIL}")
    ex_custom = " and ContainerGroupName_s startswith execution" if execution else ""
    ex_monitor = " and ContainerGroupName startswith execution" if execution else ""
    lines = [
        f"let job = {kql_string(job_name)};",
        f"let execution = {kql_string(execution)};",
        "union isfuzzy=true",
        f"    (ContainerAppConsoleLogs_CL | where ContainerJobName_s == job{ex_custom}"
        " | project TimeGenerated, Log = Log_s),",
        f"    (ContainerAppConsoleLogs | where JobName == job{ex_monitor} | project TimeGenerated, Log)",
    ]
    # The trainer's progress events are on the console too; they are data, not log lines.
    lines.append(f"| where Log !startswith {kql_string(EVENT_PREFIX)}")
    if grep:
        lines.append(f"| where Log contains {kql_string(grep)}")
    lines += [f"| top {tail} by TimeGenerated desc", "| order by TimeGenerated asc"]
    return "\n".join(lines)


def portal_links(cfg: AcaConfig, run: Run) -> dict[str, str]:
    """Links for a run's thread: the job, its executions, and a Log Analytics query for the run. Pure."""
    job_id = cfg.job_id
    links = {"job": f"{PORTAL}/#resource{job_id}/overview"}
    if run.execution_id:
        links["execution"] = f"{PORTAL}/#resource{job_id}/executionHistory"
    query = build_log_query(cfg.job_name, run.execution_id, tail=MAX_TAIL)
    packed = quote(base64.b64encode(gzip.compress(query.encode("utf-8"), mtime=0)).decode(), safe="")
    if cfg.log_analytics_workspace_name:
        scope = (f"/subscriptions/{cfg.subscription_id}/resourceGroups/{cfg.resource_group}/providers/"
                 f"Microsoft.OperationalInsights/workspaces/{cfg.log_analytics_workspace_name}")
    else:
        scope = job_id
    links["logs"] = (f"{PORTAL}/#blade/Microsoft_Azure_Monitoring_Logs/LogsBlade/resourceId/{quote(scope, safe='')}"
                     f"/source/LogsBlade.AnalyticsShareLinkToQuery/q/{packed}/timespan/P7D")
    return links


def query_logs(clients, job_name: str, execution: str = "", *, tail: int = 50, grep: str = "",
               since: dt.timedelta = dt.timedelta(days=7)) -> list[str]:
    """Console lines from Log Analytics, oldest first."""
    # heavy: loaded with the first Log Analytics query
    from azure.monitor.query import LogsQueryStatus

    cfg: AcaConfig = clients.cfg
    cfg.require("Reading logs from Log Analytics", "log_analytics_workspace_id")
    query = build_log_query(job_name, execution, tail=tail, grep=grep)
    with azure_call("query Log Analytics"):
        result = clients.logs.query_workspace(cfg.log_analytics_workspace_id, query, timespan=since)
    if result.status == LogsQueryStatus.PARTIAL:
        tables = result.partial_data
    elif result.status == LogsQueryStatus.SUCCESS:
        tables = result.tables
    else:
        raise BackendError(f"Log Analytics could not run the query: {getattr(result, 'message', result)}")
    lines: list[str] = []
    for table in tables:
        cols = list(table.columns)
        at = cols.index("Log") if "Log" in cols else len(cols) - 1
        lines += [str(row[at]) for row in table.rows if row[at] is not None]
    return lines


def check_logs_request(tail: int, grep: str | None) -> None:
    """Reject a bad logs request with a message that says what to send instead."""
    if not isinstance(tail, int) or not 1 <= tail <= MAX_TAIL:
        raise BackendError(f"--tail must be a whole number from 1 to {MAX_TAIL}, not {tail!r}")
    if grep is not None and (len(grep) > MAX_GREP or "\n" in grep or not grep.strip()):
        raise BackendError(f"--grep takes one line of text of at most {MAX_GREP} characters")


def run_logs(clients, run: Run, *, tail: int = 50, grep: str | None = None) -> LogsAnswer:
    """The answer to a logs request (the last `tail` lines, holding `grep`) for a run on the ACA backend: Log Analytics
    first; when it has nothing yet (ingestion lags) or is not configured, the run's train.log on the share."""
    check_logs_request(tail, grep)
    cfg: AcaConfig = clients.cfg
    note = ""
    if not run.execution_id:
        return LogsAnswer([], "none", f"{run.id} has not started on Azure yet: no logs.")
    if cfg.log_analytics_workspace_id:
        lines = query_logs(clients, cfg.job_name, run.execution_id, tail=tail, grep=grep or "")
        if lines:
            return LogsAnswer(mask_lines(lines, masks_for_job(clients)), "Log Analytics")
        note = "Log Analytics has no lines for this run yet (it lags by a few minutes); showing train.log."
    else:
        note = "LOG_ANALYTICS_WORKSPACE_ID is not set in infra/finetuning.config.json; showing train.log."
    with azure_call("read the run's train.log"):
        data, _whole = sharefs.read_tail(clients.share, f"runs/{run.id}/train.log", max(65536, tail * 400))
    lines = grep_lines(split_log(data), grep, tail)
    return LogsAnswer(mask_lines(lines, masks_for_job(clients)), "train.log on the share", note)
