"""The inference server that runs in the container:
`python -m payload.serve --base PATH [--adapter PATH] [--adapters MANIFEST.json] [--base-only]`.

One port serves a Gradio chat UI at `/`, an OpenAI-compatible `/v1/chat/completions` and `/v1/models`, the adapter
admin routes `/admin/adapters` and `/admin/reload`, and `/healthz`. One server serves one base model and any number of
LoRA adapters on it; the request's `model` picks one (its name, run id or alias; the base by its folder name).
Requests are batched: see payload/serving/batching.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from payload.serving.app import API_KEY_ENV, build_app
from payload.serving.engine import StartupError, load_engine
from payload.serving.manifest import AdapterManifest, manifest_exists_or_folder

# This module is the command line only: the engine, the scheduler, the manifest, the OpenAI-compatible schema, the UI
# and the app are in payload/serving/.

log = logging.getLogger("payload.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m payload.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, type=Path, help="base model folder (config.json, weights, tokenizer)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, help="LoRA adapter folder a run wrote (<run folder>/adapter); "
                                                    "requests without 'model' get it")
    which.add_argument("--base-only", action="store_true", help="serve the base model without an --adapter")
    ap.add_argument("--adapters", type=Path, metavar="MANIFEST",
                    help='JSON file {"adapters": [{"name", "path", "aliases", "run"}]} of adapters to load; followed '
                         "while the server runs (see payload/serving/manifest.py)")
    ap.add_argument("--model-name", help="model id for clients of --adapter (default: the run id, from the adapter's "
                                         "folder), or of the base with --base-only (default: its folder name)")
    ap.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    ap.add_argument("--port", type=int, default=7860, help="port for the UI, the API and /healthz (default 7860)")
    ap.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                    help="load the base in 4-bit NF4 (default: on GPU yes, on CPU no)")
    ap.add_argument("--max-batch", type=int, default=16,
                    help="most requests generated together (default 16; 1 runs them one at a time)")
    ap.add_argument("--max-queue", type=int, default=64,
                    help="most requests waiting for a batch; more are answered 429 with Retry-After (default 64)")
    ap.add_argument("--batch-window-ms", type=float, default=5.0,
                    help="how long the first waiting request waits for others to batch with (default 5)")
    ap.add_argument("--no-ui", action="store_true", help="serve the API and /healthz only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Logs go to stdout; stderr carries only a startup error, in one line.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.adapter is None and not args.base_only and args.adapters is None:
        print("payload.serve: nothing to serve: give --adapter PATH (a run's adapter folder), --adapters MANIFEST "
              "(a list of them), or --base-only to serve the base model alone", file=sys.stderr)
        return 2
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            print(f"payload.serve: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.adapters is not None and (problem := manifest_exists_or_folder(args.adapters)):
        print(f"payload.serve: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for the hub
    try:
        _quiet_libraries()
        engine = load_engine(args.base, args.adapter, load_in_4bit=args.load_in_4bit, model_name=args.model_name,
                             max_batch=args.max_batch, max_queue=args.max_queue,
                             batch_window_s=args.batch_window_ms / 1000)
    except StartupError as e:
        print(f"payload.serve: {e}", file=sys.stderr)
        return 2
    manifest = None
    if args.adapters is not None:
        # Entries that do not fit are refused (GET /admin/adapters says why); they never stop the server.
        manifest = AdapterManifest(engine, args.adapters)
        manifest.start()
    api_key = os.environ.get(API_KEY_ENV) or None
    app = build_app(engine, api_key=api_key, ui=not args.no_ui, manifest=manifest)
    log.info("serving %s (%s) on http://%s:%d, batches of up to %d, API key %s",
             ", ".join(m.id for m in engine.models()), engine.description, args.host, args.port, args.max_batch,
             "required" if api_key else "not required")

    import uvicorn  # the server itself, needed only once the model is loaded

    uvicorn.run(app, host=args.host, port=args.port, log_config=None, timeout_graceful_shutdown=10)
    return 0


def _quiet_libraries() -> None:
    """Send library logs and warnings to our log on stdout, without progress bars: stderr is for startup errors."""
    import transformers  # heavy: --help and a missing --adapter answer without it

    logging.captureWarnings(True)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
