"""Where a base model (or its tokenizer) is loaded from: a folder in the workspace, `model-cache/<id>`, or the hub.

Torch-free, shared by the trainer and the dataset validator.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_CACHE = "model-cache"


class ModelNotFound(ValueError):
    """One line naming the model and what to do."""


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None when it can): one quick connection instead of the hub client's
    minute of retries when there is no network."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None       # behind a proxy a direct connection proves nothing; let the hub client try

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"


def resolve_model(name: str, workspace: str | Path | None = None, what: str = "base_model") -> tuple[str, bool]:
    """(a local folder, True) or (a hub id to download, False).

    A folder is taken as given (relative to the workspace root); a hub id is looked for in `model-cache/<id>`
    first (the seed's layout) and only then on the hub, when the hub is not switched off."""
    ws = Path(workspace) if workspace else Path.cwd()
    p = Path(name)
    direct = p if p.is_absolute() else ws / p
    if direct.is_dir():
        if not (direct / "config.json").is_file() and not (direct / "tokenizer_config.json").is_file():
            raise ModelNotFound(f"{what} '{name}': the folder holds no config.json; it is not a saved model")
        return str(direct), True
    is_hub_id = bool(HUB_ID.match(name)) and not name.startswith(".")
    cached = ws / MODEL_CACHE / name
    if is_hub_id and cached.is_dir():
        return str(cached), True
    if not is_hub_id:
        raise ModelNotFound(f"{what} '{name}': folder not found (paths are relative to the workspace root)")
    if not hub_allowed():
        raise ModelNotFound(f"{what} '{name}': no such folder, not in {MODEL_CACHE}/{name}, and the hub is off "
                            f"(HF_HUB_OFFLINE); put the model in {MODEL_CACHE}/{name}")
    why = hub_unreachable()
    if why:
        raise ModelNotFound(f"{what} '{name}': no such folder, not in {MODEL_CACHE}/{name}, and the hub cannot be "
                            f"reached ({why}); put the model in {MODEL_CACHE}/{name}")
    return name, False


def hub_failure(name: str, err: BaseException, what: str = "base_model") -> ModelNotFound:
    """The one-line message for a hub download that failed (no network, no access, no such repo)."""
    text = str(err).strip()
    reason = text.splitlines()[0][:200] if text else type(err).__name__
    return ModelNotFound(f"{what} '{name}': not a folder here, not in {MODEL_CACHE}/{name}, and the hub did not "
                         f"give it ({reason}); put the model in {MODEL_CACHE}/{name}, or check the network and "
                         "HF_TOKEN")
