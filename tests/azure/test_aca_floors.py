"""The Azure SDK floors: pyproject.toml's and ci/azure-floors.txt's (what `make test-azure-floors` installs) agree, and
a floor that the other Azure tests leave unchecked (Files over Entra ID) is checked here."""

from __future__ import annotations

import dataclasses
import tomllib
from types import SimpleNamespace

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from jobs.backends.aca import share as sharefs
from jobs.backends.aca.backend import AcaBackend
from tests.azure.conftest import make_clients
from tests.conftest import ROOT

FLOORS = ROOT / "ci" / "azure-floors.txt"


def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def floor_pins() -> dict[str, Version]:
    pins = {}
    for line in FLOORS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            [spec] = r.specifier
            assert spec.operator == "==", f"{line}: ci/azure-floors.txt pins each package with =="
            pins[canonicalize_name(r.name)] = Version(spec.version)
    return pins


def floor_of(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(lows) if lows else None


def test_every_azure_floor_in_pyproject_is_the_version_the_floors_job_installs():
    reqs, pins = pyproject_requirements(), floor_pins()
    azure = {name: req for name, req in reqs.items() if name.startswith("azure-")}
    assert len(azure) >= 5
    for name, req in azure.items():
        assert floor_of(req) is not None, f"pyproject.toml: {req} has no >= floor"
        assert name in pins, f"{name} is in pyproject.toml but not pinned in ci/azure-floors.txt"
        assert pins[name] == floor_of(req), (
            f"{name}: pyproject.toml's floor is {floor_of(req)}, ci/azure-floors.txt pins {pins[name]}; "
            f"change both together")
    # A pin of one of our other requirements (the stand-ins' aiohttp, trustme, jsonschema) is its floor too.
    for name, pinned in pins.items():
        if name in reqs:
            assert floor_of(reqs[name]) == pinned, (
                f"{name}: pyproject.toml's floor is {floor_of(reqs[name])}, ci/azure-floors.txt pins {pinned}")


def test_ci_runs_the_floors_job():
    assert "make test-azure-floors" in (ROOT / ".ci" / "run").read_text()
    assert "ci/azure-floors.txt" in (ROOT / "Makefile").read_text()


def test_files_over_entra_id_sends_the_backup_intent_on_the_share_check_and_on_files(aca, tmp_path):
    # No storage key: the share client takes the token credential with token_intent="backup" (12.12.0 and up), and
    # only 12.18.0 and up send the intent on share-level calls such as the doctor's get_share_properties.
    cfg = dataclasses.replace(aca.cfg, storage_key="")
    clients = make_clients(cfg)
    try:
        aca.standin.requests.clear()
        checks = {c.what: c for c in AcaBackend(SimpleNamespace(workspace=tmp_path), cfg, clients).doctor()}
        assert checks["Azure Files share"].ok, checks["Azure Files share"].detail
        sharefs.write_bytes(clients.share, "floors/probe.txt", b"over Entra ID")
        assert sharefs.read_range(clients.share, "floors/probe.txt") == b"over Entra ID"
        sent = [{k.lower(): v for k, v in r.headers.items()} for r in aca.standin.requests if r.service == "files"]
        assert sent and all(h.get("x-ms-file-request-intent") == "backup" and h.get("authorization", "").startswith(
            "Bearer ") for h in sent)
    finally:
        clients.close()
