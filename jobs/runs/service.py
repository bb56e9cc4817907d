"""What the bot calls: submit, look at, cancel and resume runs. Synchronous, quick Redis operations (the bot runs them
in a thread); slow work is enqueued for the workers. Every refusal is a RunRejected whose text a person can act on."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from jobs.backends import get_backend
from jobs.backends.protocol import LogsAnswer
from jobs.core import cost, store
from jobs.core.domain import RUN_ID_RE, Run, RunEvent, RunState
from jobs.core.errors import Hint, RunRejected
from jobs.core.masking import environment_secrets, mask_lines
from jobs.core.runconfig import build_train_config, params_from_command
from jobs.core.settings import JobSettings
from jobs.runs import costs, transitions
from jobs.runs.transitions import can_resume  # noqa: F401  (the bot offers Resume by the same rule)
from payload.config import TrainConfig
from payload.validate import validate_dataset

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 10
MAX_NAME = 64
MAX_PATH = 300
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FLAGS = {"num_epochs": "--epochs", "learning_rate": "--lr", "max_steps": "--max-steps"}
REQUEST_TTL_S = 3600
REQUEST_WAIT_S = 5.0  # how long a repeated request waits for its first delivery to create the run


# Checks (pure but for looking at the workspace) ----------------------------------------------------------------------

def _relative_path(value: str, what: str) -> PurePosixPath:
    text = value.strip()
    if not text:
        raise RunRejected(f"{what} is empty: give a path relative to the workspace")
    if len(text) > MAX_PATH:
        raise RunRejected(f"{what} is longer than {MAX_PATH} characters: give a shorter path")
    if "\\" in text or any(ord(c) < 32 for c in text):
        raise RunRejected(f"{what} {text!r} has characters a path cannot have: use / between folders")
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts:
        raise RunRejected(f"{what} {text!r} leads outside the workspace: give a path relative to the workspace, "
                          "like datasets/train.jsonl")
    return path


def _inside(workspace: Path, rel: PurePosixPath) -> Path:
    root = workspace.resolve()
    full = (root / rel).resolve()
    if not full.is_relative_to(root):
        raise RunRejected(f"{rel} leads outside the workspace (through a link): put the file inside the workspace")
    return full


def resolve_model(workspace: Path, model: str) -> str:
    """A folder relative to the workspace, else `model-cache/<model>`, else a hub id as it is (fetched by the
    trainer). Returns the value for the run config."""
    rel = _relative_path(model, "--model")
    for candidate in (rel, PurePosixPath("model-cache") / rel):
        # No link check here, unlike datasets: model-cache entries are often links to a shared cache, put there by
        # whoever runs the workspace; the name itself cannot leave the workspace (checked above).
        if (workspace / candidate).is_dir():
            return str(candidate)
    text = str(rel)
    if HUB_ID_RE.match(text) and rel.parts[0] != "model-cache":
        return text
    raise RunRejected(f"model {text!r} not found: the workspace has no folder {text} or model-cache/{text}. Give a "
                      "folder relative to the workspace (like model-cache/tiny) or a hub id (like "
                      "microsoft/Phi-3-mini-4k-instruct)")


def check_dataset(workspace: Path, dataset: str | None) -> tuple[str, Path]:
    if dataset is None or not dataset.strip():
        raise RunRejected("a run needs a dataset: add --dataset PATH, a JSONL file relative to the workspace (like "
                          "datasets/train.jsonl)")
    rel = _relative_path(dataset, "--dataset")
    full = _inside(workspace, rel)
    if not full.exists():
        raise RunRejected(f"dataset {rel} not found in the workspace: put the file at {rel} in the workspace or "
                          "check the path")
    if not full.is_file():
        raise RunRejected(f"dataset {rel} is a folder: give a JSONL file")
    return str(rel), full


def validated(path: Path, max_seq_length: int):
    """The validator's report on a dataset file, computed once per version of the file: a team starts many runs on
    the same dataset, and each check reads and parses all of it in the bot process."""
    st = path.stat()
    return _validate_version(str(path), st.st_mtime_ns, st.st_size, max_seq_length)


@functools.lru_cache(maxsize=64)
def _validate_version(path: str, mtime_ns: int, size: int, max_seq_length: int):
    return validate_dataset(path, max_seq_length=max_seq_length)


def checksum(path: Path) -> str:
    """The dataset file's sha256 (hex), computed once per version of the file, like its validation."""
    st = path.stat()
    return _checksum_version(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _checksum_version(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_dataset_errors(rel: str, full: Path, errors: list[str]) -> str:
    shown = [e.replace(str(full), rel, 1) for e in errors[:MAX_REPORTED_ERRORS]]
    lines = [f"dataset {rel} has problems; fix them and run again:", *(f"  {e}" for e in shown)]
    if len(errors) > MAX_REPORTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_REPORTED_ERRORS} more")
    return "\n".join(lines)


def _check_name(name: str | None) -> str:
    text = (name or "").strip()
    if len(text) > MAX_NAME:
        raise RunRejected(f"--name is longer than {MAX_NAME} characters: give a shorter name")
    if any(not c.isprintable() for c in text):
        raise RunRejected("--name has control characters: use letters, digits and punctuation")
    return text


def _check_run_id(run_id: str) -> str:
    text = (run_id or "").strip()
    if not RUN_ID_RE.match(text):
        raise RunRejected(f"{text!r} is not a run id: run ids look like ft-0042", hint=Hint("list", "shows them"))
    return text


def _params(settings: JobSettings, model: str, dataset: str, epochs, lr, max_steps) -> tuple[dict, TrainConfig]:
    """The run's params, checked by building the run config they make (returned too)."""
    params = params_from_command(epochs=epochs, lr=lr, max_steps=max_steps)
    try:
        config = build_train_config("ft-0000", model, dataset, params, settings.train_overrides)
    except ValidationError as e:
        first = e.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        flag = FLAGS.get(key, key)
        raise RunRejected(f"{flag} {params.get(key)!r} is not accepted: {first['msg'].lower()}") from None
    return params, config


# Submitting ----------------------------------------------------------------------------------------------------------

def submit_run(settings: JobSettings, *, requester: str, channel: str, model: str | None = None,
               dataset: str | None = None, epochs: float | None = None, lr: float | None = None,
               max_steps: int | None = None, name: str | None = None, request_id: str | None = None,
               dataset_source: str = "") -> Run:
    """Check the request, then create the run, report it queued and ask a worker to admit it.

    `request_id` (an addition to the contract; e.g. the slash command's trigger_id) makes a repeated submission of the
    same request return the first run instead of creating a second one. `dataset_source`: where the dataset came
    from (a link), recorded with the dataset's checksum.
    """
    if not requester or not channel:
        raise RunRejected("a run needs a requester and a channel")
    conn = store.connect(settings)
    request_key = store.REQUEST_KEY.format(request_id) if request_id else None
    if request_key:
        existing = _existing_request(conn, request_key)
        if existing is not None:
            return existing

    workspace = Path(settings.workspace)
    model_ref = resolve_model(workspace, model if model is not None else settings.default_model)
    dataset_ref, dataset_path = check_dataset(workspace, dataset)
    params, config = _params(settings, model_ref, dataset_ref, epochs, lr, max_steps)
    run_name = _check_name(name)

    try:
        report = validated(dataset_path, config.max_seq_length)
    except (OSError, UnicodeError) as e:
        raise RunRejected(f"dataset {dataset_ref} cannot be read ({e}): check the file") from None
    if not report.ok:
        raise RunRejected(format_dataset_errors(dataset_ref, dataset_path, list(report.errors)))
    try:
        sha256 = checksum(dataset_path)
    except OSError as e:
        raise RunRejected(f"dataset {dataset_ref} cannot be read ({e}): check the file") from None
    estimate = costs.estimate_run(settings, conn, model_ref, config, report)
    needs = cost.approval_reason(estimate.usd, estimate.month_spent_usd, settings.run_budget_usd,
                                 settings.monthly_budget_usd)

    # The request key names the run's id before the run exists, so that whoever creates it (this call, or a repeat of
    # the request after this process died half way) creates that one run and no other.
    run_id = None
    if request_key:
        run_id, first = _claim_request(conn, request_key)
        if not first:
            existing = _existing_request(conn, request_key, wait_s=REQUEST_WAIT_S)
            if existing is not None:
                return existing
            log.warning("request %s named run %s, which was never created: creating it now", request_id, run_id)
    try:
        run = Run(id=run_id or store.new_run_id(conn), requester=requester, channel=channel, model=model_ref,
                  dataset=dataset_ref, params=params, name=run_name, backend=settings.backend,
                  dataset_sha256=sha256, dataset_source=dataset_source, estimate=estimate.to_dict(),
                  # held until an approver clicks (jobs.deploys.approval.request_budget_approval makes the request)
                  budget_approval={"state": "pending", "reason": needs} if needs else {})
        if request_key and store.load_run(conn, run.id) is not None:
            return store.load_run(conn, run.id)
        store.create_run(conn, run, lambda position: [
            RunEvent(run.id, "queued", {"position": 0, "held": needs} if needs else {"position": position})])
    except BaseException:
        if request_key:
            conn.delete(request_key)
        raise
    if run.held:
        return run  # the caller asks for the approval (jobs.deploys.approval.request_budget_approval)
    # If this enqueue is lost, the workers' reconcile pass admits the run.
    transitions.enqueue_admit(settings)
    return run


def _claim_request(conn, key: str) -> tuple[str, bool]:
    """The run id this request creates, and whether this is the request's first delivery (a new id) or a repeat (the
    id its first delivery chose)."""
    while True:
        candidate = store.new_run_id(conn) if not conn.exists(key) else None
        if candidate and conn.set(key, candidate, nx=True, ex=REQUEST_TTL_S):
            return candidate, True
        run_id = conn.get(key)
        if run_id:
            return run_id, False


def _existing_request(conn, key: str, wait_s: float = 0.0) -> Run | None:
    """The request's run, once it exists; waits up to `wait_s` for a first delivery that is creating it right now."""
    deadline = time.monotonic() + wait_s
    while True:
        run_id = conn.get(key)
        run = store.load_run(conn, run_id) if run_id else None
        if run is not None or not run_id or time.monotonic() >= deadline:
            return run
        time.sleep(0.05)


# Looking -------------------------------------------------------------------------------------------------------------

def get_run(settings: JobSettings, run_id: str) -> Run | None:
    if not RUN_ID_RE.match(run_id or ""):
        return None
    return store.load_run(store.connect(settings), run_id)


def list_runs(settings: JobSettings, limit: int = 20) -> list[Run]:
    """The newest runs first."""
    conn = store.connect(settings)
    return store.load_runs(conn, store.recent_run_ids(conn, max(1, min(limit, 200))))


def queue_position(settings: JobSettings, run_id: str) -> int | None:
    return store.queue_position(store.connect(settings), run_id)


def run_logs(settings: JobSettings, run_id: str, tail: int, grep: str | None) -> LogsAnswer:
    """The last `tail` log lines of the run (holding `grep`), from its backend, with known secrets masked."""
    run = _known(settings, run_id)
    found = get_backend(settings).run_logs(run, tail, grep)
    found.lines = mask_lines(found.lines, environment_secrets())
    return found


def _known(settings: JobSettings, run_id: str) -> Run:
    run = store.load_run(store.connect(settings), _check_run_id(run_id))
    if run is None:
        raise RunRejected(f"there is no run {run_id}", hint=Hint("list", "shows the runs"))
    return run


# Acting --------------------------------------------------------------------------------------------------------------

def cancel_run(settings: JobSettings, run_id: str, by: str) -> Run:
    """A queued run is cancelled at once; a preparing or running one is marked and a worker stops it (the run then
    ends as cancelled, with a "cancelled" event)."""
    conn = store.connect(settings)
    run = _known(settings, run_id)
    if run.state.terminal:
        raise RunRejected(f"{run.id} has already {_ended(run.state)}: there is nothing to cancel")
    if run.state is RunState.QUEUED:
        cancelled = transitions.cancel_queued(conn, run.id, by)
        if cancelled is not None:
            transitions.enqueue_admit(settings)  # the line moved: report the new positions
            return cancelled

    def step(r: Run) -> list[RunEvent] | None:
        if r.state.terminal or r.cancelled_by:
            return None
        r.cancelled_by = by
        return [RunEvent(r.id, "cancelling", {"by": by})]

    changed = store.update_run(conn, run.id, step)
    run = changed[0] if changed else store.load_run(conn, run.id)
    if run.state.terminal:
        if run.state is RunState.CANCELLED:
            return run
        raise RunRejected(f"{run.id} has already {_ended(run.state)}: there is nothing to cancel")
    transitions.enqueue_stop(settings, run.id)
    return run


def resume_run(settings: JobSettings, run_id: str, by: str) -> Run:
    """Put a failed, timed-out or cancelled run back in line (see jobs.runs.transitions.resume)."""
    return transitions.resume(settings, _known(settings, run_id), by)


def _ended(state: RunState) -> str:
    return {RunState.SUCCEEDED: "succeeded", RunState.FAILED: "failed", RunState.CANCELLED: "been cancelled",
            RunState.TIMED_OUT: "timed out"}.get(state, str(state))
