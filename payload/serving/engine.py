"""The inference engine: checks and loads the base model once, loads and unloads LoRA adapters on it by name (they
share the base's weights; each costs only its own size), and turns chat messages into generations that the batching
scheduler (`batching`) runs.

torch, transformers, peft and safetensors are imported inside the functions that use them: a wrong path must be a
one-line error before seconds go into importing them, and torch only after `torch_problem()` has said it works.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payload.lorashapes import adapter_mismatch
from payload.runtime import cpu_budget, env_threads, pick_threads, torch_problem
from payload.serving.openai_schema import APIError
from payload.serving.sampling import SamplingParams, StopScanner  # noqa: F401 (re-exported)

log = logging.getLogger("payload.serve")  # the server's one logger name, as its operators know it from the log

DEFAULT_MAX_TOKENS = 512


# ---------------------------------------------------------------------------------------------------------------------
# Startup checks: a wrong path is a one-line message and exit code 2, never a traceback.

class StartupError(Exception):
    """What is wrong with the model or adapter given on the command line, and what to do, in one line."""


def check_base(base: Path) -> None:
    if not base.is_dir():
        raise StartupError(f"base model folder not found: {base} (give --base the folder that holds config.json)")
    if not (base / "config.json").is_file():
        raise StartupError(f"no config.json in {base}: --base must be a model folder saved by transformers")


def check_adapter(adapter: Path) -> dict[str, Any]:
    """Return the adapter's parsed adapter_config.json."""
    if not adapter.is_dir():
        raise StartupError(f"adapter folder not found: {adapter} (a finished run writes it to <run folder>/adapter; "
                           "use --base-only to serve the base model alone)")
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise StartupError(f"adapter_config.json not found in {adapter}: give --adapter the folder a finished run "
                           "wrote (<run folder>/adapter), or --base-only to serve the base model alone")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StartupError(f"{config_file} cannot be read as JSON ({e}); the adapter folder is damaged, "
                           "copy it again from the run folder") from None
    if not isinstance(config, dict):
        raise StartupError(f"{config_file} is not a JSON object; the adapter folder is damaged")
    return config


def default_model_id(base: Path, adapter: Path | None) -> str:
    """The id clients see: the run id for `<run folder>/adapter`, else the adapter's or the base's folder name."""
    if adapter is None:
        return base.resolve().name
    adapter = adapter.resolve()
    return adapter.parent.name if adapter.name == "adapter" else adapter.name


# ---------------------------------------------------------------------------------------------------------------------
# The engine: one base, many adapters, one scheduler (stops and sampling parameters: payload.serving.sampling).

@dataclass
class ServedModel:
    """One model id clients can ask for: the base (`adapter` None) or a LoRA adapter loaded under `adapter`."""
    id: str
    adapter: str | None
    tokenizer: Any
    created: int = field(default_factory=lambda: int(time.time()))
    path: Path | None = None
    run: str | None = None
    aliases: tuple[str, ...] = ()
    requests: int = 0  # requests accepted for it since it was loaded (GET /admin/adapters)

    def card(self, base_id: str) -> dict[str, Any]:
        """The model's entry in GET /v1/models, in OpenAI's shape (plus where an adapter came from)."""
        card: dict[str, Any] = {"id": self.id, "object": "model", "created": self.created, "owned_by": "tuneops"}
        if self.adapter is not None:
            card.update(parent=base_id, run=self.run, aliases=list(self.aliases))
        return card


class Engine:
    """The base model, the adapters loaded on it, and the scheduler that runs every forward pass.

    The base is loaded once; the first adapter wraps it in a PeftModel and later ones are added to that model
    (`load_adapter`), so N adapters cost N adapters' weights, not N bases. `model_lock` is held for each forward pass
    and each adapter load or unload, so neither ever sees the other half done.
    """

    def __init__(self, model, tokenizer, base_id: str, *, base_folder: str | None = None, description: str = "",
                 max_batch: int = 16, max_queue: int = 64, batch_window_s: float = 0.005):
        from payload.serving.batching import Scheduler

        self.base = model  # the transformers model; PEFT injects its LoRA layers into it in place
        self.peft = None  # the PeftModel around `base`, from the first adapter on
        self.base_id = base_id
        self.base_folder = base_folder or base_id  # what adapter_config.json should name as the base
        self.description = description or base_id
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads at once
        self.model_lock = threading.RLock()
        self._registry = threading.Condition()  # guards the served models and the adapters' use counts
        self._served: dict[str, ServedModel] = {base_id: ServedModel(base_id, None, tokenizer)}
        self._aliases: dict[str, str] = {}
        self._in_use: Counter[str] = Counter()
        # Requests accepted per model id since the server started, kept across an adapter's unload and reload (the
        # endpoint's `served` record: payload.serving.manifest).
        self.served_total: Counter[str] = Counter()
        self._armed: tuple[tuple[str, ...], Any] | None = None  # PEFT's per-row adapter hooks, see _arm_mixed
        self.default_id = base_id
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.device = model.device
        # transformers 5.x renames the forward's `past_key_values` to `cache` (the old name warns until 5.40).
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.scheduler = Scheduler(self, max_batch=max_batch, max_queue=max_queue, batch_window_s=batch_window_s)

    # --- what is served ----------------------------------------------------------------------------------------------

    @property
    def model(self):
        """The model the forward passes go through: the PeftModel once an adapter was loaded, else the base."""
        return self.peft if self.peft is not None else self.base

    @property
    def model_id(self) -> str:
        """The id a request without `model` gets: the --adapter's (or --model-name), else the base's."""
        return self.default_id

    @property
    def tokenizer(self):
        return self._served[self.default_id].tokenizer

    def models(self) -> list[ServedModel]:
        """Everything served, the default first."""
        with self._registry:
            return sorted(self._served.values(), key=lambda m: (m.id != self.default_id, m.adapter is None, m.id))

    def resolve(self, name: str | None) -> ServedModel:
        """The served model a request's `model` names (its id or an alias); 404 in OpenAI's shape if none."""
        with self._registry:
            if name is None:
                return self._served[self.default_id]
            served = self._served.get(self._aliases.get(name, name))
            if served is None:
                ids = ", ".join(repr(m.id) for m in self._served.values())
                raise APIError(404, f"model {name!r} is not served here; this server serves {ids} "
                                    "(GET /v1/models lists them)", param="model", code="model_not_found")
            return served

    def lookup(self, name: str) -> ServedModel | None:
        """The served model of this id or alias, None when there is none (no 404: for status pages)."""
        with self._registry:
            return self._served.get(self._aliases.get(name, name))

    def _claim(self, name: str | None) -> ServedModel:
        with self._registry:
            served = self.resolve(name)
            if served.adapter is not None:
                self._in_use[served.adapter] += 1
            return served

    def release(self, served: ServedModel) -> None:
        if served.adapter is None:
            return
        with self._registry:
            self._in_use[served.adapter] -= 1
            self._registry.notify_all()

    # --- adapters ----------------------------------------------------------------------------------------------------

    def load_adapter(self, path: Path, name: str, *, aliases: tuple[str, ...] = (), run: str | None = None,
                     default: bool = False) -> ServedModel:
        """Check an adapter against the base and load it under `name`; StartupError (one line) when it does not fit.

        Adapters already loaded are untouched by a refusal: every check runs before PEFT changes the model."""
        with self._registry:
            for taken in (name, *aliases):
                if taken in self._served or taken in self._aliases:
                    raise StartupError(f"the name {taken!r} is already served here; give the adapter in {path} "
                                       "another name or alias")
        config = check_adapter(path)
        _check_adapter_fits(path, config, self.base_folder, self.base)
        tokenizer = self._served[self.base_id].tokenizer
        if (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer  # heavy: see the module docstring

            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as e:
                raise StartupError(f"cannot load the tokenizer in {path}: {_first_line(e)}") from None
            if not tokenizer.chat_template:
                raise StartupError(f"the tokenizer in {path} has no chat template; save the tokenizer the adapter "
                                   "was trained with into its folder, or remove it to use the base's")
        from peft import PeftModel  # heavy: only when there is an adapter
        from safetensors import SafetensorError  # comes with transformers

        with self.model_lock:
            self.disarm()  # hooks armed for a batch would miss LoRA layers the new adapter adds
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                else:
                    self.peft.load_adapter(path, adapter_name=name)
                    if not self.peft.active_adapters:
                        self.peft.set_adapter(name)
                self.peft.eval()
            except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
                self._forget_adapter(name)
                raise StartupError(f"cannot apply the adapter in {path} to {self.base_id}: {_first_line(e)}") from None
        served = ServedModel(name, name, tokenizer, path=path, run=run, aliases=tuple(aliases))
        with self._registry:
            self._served[name] = served
            self._aliases.update({alias: name for alias in aliases})
            if default:
                self.default_id = name
        log.info("adapter %s loaded from %s%s", name, path, f" (aliases {', '.join(aliases)})" if aliases else "")
        return served

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter: new requests get 404 at once; it leaves memory when its last request ends."""
        with self._registry:
            served = self._served.get(name)
            if served is None or served.adapter is None:
                return
            del self._served[name]
            self._aliases = {a: n for a, n in self._aliases.items() if n != name}
            if self.default_id == name:
                self.default_id = self.base_id
            # PEFT cannot run a batch row on a deleted adapter: wait for those still generating with it.
            self._registry.wait_for(lambda: self._in_use[served.adapter] <= 0)
            del self._in_use[served.adapter]
        with self.model_lock:
            self.disarm()
            self._forget_adapter(served.adapter)
        log.info("adapter %s unloaded", name)

    def _forget_adapter(self, adapter: str) -> None:
        if self.peft is None or adapter not in self.peft.peft_config:
            return
        self.peft.delete_adapter(adapter)
        if self.peft.peft_config:
            # The PeftModel's own forward looks up its active adapter's config even when rows name theirs.
            self.peft.set_adapter(next(iter(self.peft.peft_config)))

    # --- generation --------------------------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, str]], served: ServedModel | None = None) -> list[int]:
        """The prompt's token ids: the chat template with the assistant's turn opened."""
        from jinja2 import (
            TemplateError,  # comes with transformers' chat templates, not a dependency of ours
        )

        tokenizer = (served or self._served[self.default_id]).tokenizer
        with self.tokenizer_lock:
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as e:
                raise APIError(400, f"the model's chat template refused these messages: {e}",
                               param="messages") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, messages: list[dict[str, str]], params: SamplingParams, model: str | None = None):
        """Queue a generation for the batching scheduler and return it (a `batching.Generation` to iterate)."""
        from payload.serving.batching import Generation

        served = self._claim(model)  # counted from here: an unload of its adapter waits for this request
        try:
            prompt_ids = self.encode(messages, served)
            room = self.max_context - len(prompt_ids)
            if params.max_tokens is None and room < 1 or params.max_tokens is not None and params.max_tokens > room:
                asked = params.max_tokens or 1
                raise APIError(400, f"this model's maximum context length is {self.max_context} tokens, but "
                                    f"{len(prompt_ids)} are in the messages and {asked} more were asked for; shorten "
                                    "the messages or lower max_tokens", param="messages",
                               code="context_length_exceeded")
        except BaseException:
            self.release(served)
            raise
        max_tokens = params.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        gen = Generation(self, served, prompt_ids, max_tokens, params)
        self.scheduler.submit(gen)  # a full queue releases it and answers 429
        with self._registry:  # counted once accepted: a request refused (400, 404, 429) served nothing
            served.requests += 1
            self.served_total[served.id] += 1
        return gen

    def new_cache(self):
        from transformers import DynamicCache  # heavy: see the module docstring

        return DynamicCache()

    def forward(self, ids, mask, positions, cache, adapters: list[str | None]):
        """One forward pass of a batch; each row through its own adapter. Returns the last position's logits."""
        with self.model_lock:
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1)
            kwargs[self._cache_kwarg] = cache
            if self.peft is None or not self.peft.peft_config:
                self.disarm()
                out = self.base(**kwargs)  # no adapter loaded (any more): the LoRA layers, if any, are empty
            elif all(a == adapters[0] for a in adapters) and adapters[0] is not None:
                # One adapter for the whole batch: the plain forward, without PEFT's per-row hooks.
                self.disarm()
                if self.peft.active_adapter != adapters[0]:
                    self.peft.set_adapter(adapters[0])
                out = self.peft(**kwargs)
            else:
                names = [a or "__base__" for a in adapters]
                if self._arm_mixed(names):
                    out = self.peft(**kwargs)
                else:
                    out = self.peft(**kwargs, adapter_names=names)
            return out.logits[:, -1, :]

    def _arm_mixed(self, names: list[str]) -> bool:
        """Keep PEFT's per-row adapter hooks on the LoRA layers for as long as the batch's rows stay the same.

        Passing `adapter_names` to each forward makes PEFT walk every module to add and remove its hooks, which cost
        more than the tiny model's whole decode step (measured: 3.5 of 7.7 ms at 16 rows). The hooks stay armed
        across steps and are re-armed when a row leaves or an adapter is loaded or unloaded (new LoRA layers). False
        when this PEFT has no such context manager: then each forward passes `adapter_names` itself."""
        arm = getattr(self.peft.base_model, "_enable_peft_forward_hooks", None)
        if arm is None:
            return False
        key = tuple(names)
        if self._armed is not None and self._armed[0] == key:
            return True
        self.disarm()
        context = arm(adapter_names=names)
        context.__enter__()
        self._armed = (key, context)
        return True

    def disarm(self) -> None:
        """Take PEFT's per-row adapter hooks off (at the end of a batch, and before any adapter load or unload)."""
        if self._armed is None:
            return  # nothing armed: the lock is not needed (a test may hold it to make requests queue up)
        with self.model_lock:
            if self._armed is not None:
                armed, self._armed = self._armed, None
                armed[1].__exit__(None, None, None)


def load_engine(base: Path, adapter: Path | None, *, load_in_4bit: bool | None = None,
                model_name: str | None = None, max_batch: int = 16, max_queue: int = 64,
                batch_window_s: float = 0.005) -> Engine:
    """Load the base (4-bit NF4 on GPU; fp32 on CPU unless `load_in_4bit`) and apply the adapter, if any.

    `model_name` names the adapter (or, without one, the base) for clients; more adapters come with `load_adapter`."""
    check_base(base)
    if adapter is not None:
        check_adapter(adapter)
    problem = torch_problem()
    if problem:
        raise StartupError(problem)

    import torch  # heavy, and only now that torch_problem() said it works
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    four_bit = on_gpu if load_in_4bit is None else load_in_4bit
    # bf16 compute on GPU (fp16 is unstable with NF4); CPUs have no fast bf16 matmul, so fp32 there.
    compute = torch.bfloat16 if on_gpu else torch.float32
    kwargs: dict[str, Any] = {"device_map": {"": 0 if on_gpu else "cpu"}}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    else:
        kwargs["dtype"] = compute
    from safetensors import SafetensorError  # comes with transformers, imported with it

    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    # RuntimeError: out of GPU memory; SafetensorError: a weights file cut short or damaged
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, SafetensorError) as e:
        raise StartupError(f"cannot load the base model from {base}: {_first_line(e)}") from None
    model.eval()
    if not on_gpu:
        # As in training: one thread for small models (spinning OpenMP threads collapse on shared cores);
        # OMP_NUM_THREADS overrides.
        torch.set_num_threads(pick_threads(model.num_parameters(), cpu_budget(), env_threads()))

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot load the tokenizer from {base}: {_first_line(e)}") from None
    if not tokenizer.chat_template and adapter is None:
        raise StartupError(f"the tokenizer in {base} has no chat template; serve an instruct/chat model "
                           "or an adapter whose folder holds the tokenizer it was trained with")

    description = f"{base.name}, {'4-bit NF4' if four_bit else str(compute).removeprefix('torch.')}, " \
                  f"{'cuda' if on_gpu else 'cpu'}"
    base_id = model_name if adapter is None and model_name else base.resolve().name
    engine = Engine(model, tokenizer, base_id, base_folder=base.resolve().name, description=description,
                    max_batch=max_batch, max_queue=max_queue, batch_window_s=batch_window_s)
    if adapter is not None:
        served = engine.load_adapter(adapter, model_name or default_model_id(base, adapter), default=True)
        if not served.tokenizer.chat_template:
            raise StartupError(f"the tokenizer in {base} has no chat template; serve an instruct/chat model "
                               "or an adapter whose folder holds the tokenizer it was trained with")
        engine.description += f", adapter {adapter}"
    return engine


def _check_adapter_fits(adapter: Path, adapter_config: dict[str, Any], base_name: str, model) -> None:
    """Refuse an adapter trained for another base before peft fails on it with a long shape dump.

    `model` is the transformers model (PEFT's layers inside it keep their in/out features, so the check holds after
    other adapters were loaded)."""
    trained_on = adapter_config.get("base_model_name_or_path") or "unknown"
    # Same shapes do not prove the same weights (two 7B Llamas look alike), so a different name is worth a warning.
    if trained_on != "unknown" and Path(trained_on).name != base_name:
        log.warning("the adapter names %r as its base but is served on %s; check its answers", trained_on, base_name)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # an older .bin adapter: peft's own load is the check
    from safetensors import (  # comes with transformers, imported with it
        SafetensorError,
        safe_open,
    )

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise StartupError(f"{weights} cannot be read ({_first_line(e)}); the adapter folder is damaged, copy it again "
                           "from the run folder") from None
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}
    problem = adapter_mismatch(shapes, linears)
    if problem:
        raise StartupError(f"the adapter in {adapter} was trained for a different base model ({problem}); "
                           f"adapter_config.json names {trained_on!r} as its base: serve it with that base")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
