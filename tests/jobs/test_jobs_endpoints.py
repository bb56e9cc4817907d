"""The endpoints' adapter manifests: written by deploys, read by `payload.serve --adapters` (its own parser checks
them here), safe against path tricks and concurrent writers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from jobs.core import endpoints
from payload.serving.manifest import parse_manifest


@pytest.mark.parametrize("model, name", [
    ("model-cache/tiny", "model-cache--tiny"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen--Qwen2.5-0.5B-Instruct"),
    ("../../etc/passwd", "etc--passwd"),
    ("/abs/.hidden", "abs--.hidden"),
    ("a b/c:d", "a-b--c-d"),
])
def test_endpoint_names_stay_inside_the_deployments_folder(model, name, tmp_path):
    assert endpoints.endpoint_name(model) == name
    assert endpoints.manifest_path(tmp_path, model).parent.parent == tmp_path / endpoints.ROOT
    with pytest.raises(ValueError):
        endpoints.endpoint_name("../..")


def test_entries_are_added_replaced_and_removed_and_the_server_reads_them(tmp_path):
    base = "model-cache/tiny"
    for run in ("ft-0001", "ft-0002"):
        (tmp_path / "runs" / run / "adapter").mkdir(parents=True)
    endpoints.add_entry(tmp_path, base, {"name": "ft-0001", "path": "runs/ft-0001/adapter", "run": "ft-0001",
                                         "aliases": ["first"], "approved_by": "U0BOSS", "since": 1.0})
    endpoints.add_entry(tmp_path, base, {"name": "ft-0002", "path": str(tmp_path / "runs/ft-0002/adapter"),
                                         "run": "ft-0002"})
    after = endpoints.add_entry(tmp_path, base, {"name": "ft-0001", "path": "runs/ft-0001/adapter",
                                                 "run": "ft-0001", "aliases": ["renamed"]})
    assert [e["name"] for e in after] == ["ft-0002", "ft-0001"] and after[1]["aliases"] == ["renamed"]

    path = endpoints.manifest_path(tmp_path, base)
    served, refused = parse_manifest(path.read_text(), path.parent)
    assert refused == {}
    assert [(e.name, e.path.resolve(), e.aliases) for e in served] == [
        ("ft-0002", (tmp_path / "runs/ft-0002/adapter").resolve(), ()),
        ("ft-0001", (tmp_path / "runs/ft-0001/adapter").resolve(), ("renamed",))]
    # Relative paths: the same file works wherever the workspace is mounted (the share on ACA).
    assert all(not Path(e["path"]).is_absolute() for e in endpoints.read_entries(tmp_path, base))

    removed, left = endpoints.remove_entry(tmp_path, base, "ft-0002")
    assert removed["run"] == "ft-0002" and [e["name"] for e in left] == ["ft-0001"]
    assert endpoints.remove_entry(tmp_path, base, "ft-0009") == (None, left)
    assert list(endpoints.endpoints(tmp_path)) == [("model-cache--tiny", left)]


def test_concurrent_deploys_of_one_base_keep_every_entry(tmp_path):
    names = [f"ft-{i:04d}" for i in range(1, 17)]
    start = threading.Barrier(len(names))

    def deploy(name: str) -> None:
        start.wait()
        endpoints.add_entry(tmp_path, "model-cache/tiny", {"name": name, "path": f"runs/{name}/adapter"})

    threads = [threading.Thread(target=deploy, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(e["name"] for e in endpoints.read_entries(tmp_path, "model-cache/tiny")) == names


def test_a_damaged_manifest_says_which_file_and_what_to_do(tmp_path):
    path = endpoints.manifest_path(tmp_path, "model-cache/tiny")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(endpoints.ManifestDamaged, match=r"adapters\.json cannot be read .*fix or delete it"):
        endpoints.read_entries(tmp_path, "model-cache/tiny")
    path.write_text('{"adapters": {}}')
    with pytest.raises(endpoints.ManifestDamaged, match="is not"):
        endpoints.add_entry(tmp_path, "model-cache/tiny", {"name": "ft-0001", "path": "runs/ft-0001/adapter"})


def test_placed_keeps_an_alias_with_its_first_owner_and_paths_relative_to_the_manifest():
    first = endpoints.new_entry("ft-0001", "support-bot", "dp-0001", "U1")
    entries = endpoints.placed([], first, "runs/ft-0001/adapter", "Qwen/Qwen2.5-0.5B-Instruct")
    assert entries[0]["path"] == "../../runs/ft-0001/adapter" and entries[0]["aliases"] == ["support-bot"]
    assert endpoints.manifest_rel("Qwen/Qwen2.5-0.5B-Instruct") == \
        "deployments/Qwen--Qwen2.5-0.5B-Instruct/adapters.json"
    second = endpoints.new_entry("ft-0002", "support-bot", "dp-0002", "U2")  # a second run of the same name
    entries = endpoints.placed(entries, second, "runs/ft-0002/adapter", "Qwen/Qwen2.5-0.5B-Instruct")
    assert [(e["name"], e["aliases"]) for e in entries] == [("ft-0001", ["support-bot"]), ("ft-0002", [])]
    again = endpoints.placed(entries, {**first, "approval": "dp-0003"}, "runs/ft-0001/adapter", "x/y")
    assert [(e["name"], e["approval"]) for e in again] == [("ft-0002", "dp-0002"), ("ft-0001", "dp-0003")]
    assert endpoints.new_entry("ft-0003", "ft-0003", "dp-0004", "U1")["aliases"] == []  # no name: no alias


def test_requests_served_sum_every_process_record_and_skip_damaged_ones(tmp_path):
    folder = endpoints.manifest_path(tmp_path, "model-cache/tiny").parent / endpoints.SERVED
    folder.mkdir(parents=True)
    (folder / "a-1-100.json").write_text(json.dumps({"requests": {"ft-0001": 3, "tiny": 1}}))
    (folder / "b-7-200.json").write_text(json.dumps({"requests": {"ft-0001": 2, "ft-0002": 5}}))
    (folder / "c-9-300.json").write_text("{half a reco")
    (folder / "d-9-400.json").write_text(json.dumps({"requests": {"ft-0002": -4, "ft-0003": "many", "x": True}}))
    assert endpoints.served_here(tmp_path, "model-cache/tiny") == {"ft-0001": 5, "tiny": 1, "ft-0002": 5}
    assert endpoints.served_here(tmp_path, "model-cache/other") == {}
