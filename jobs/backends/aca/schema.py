"""Azure's own REST specs as a gate: a request tuneops sends to Azure is checked against the JSON schemas and
parameters of the official azure-rest-api-specs (excerpts in restspec/), so the local stand-in refuses what the spec
refuses, in the error shape of the service."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any
from urllib.parse import urldefrag, urljoin

from jsonschema import Draft4Validator, ValidationError, validators
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT4

# Each excerpt is registered under this base + its source path, so the specs' own relative $refs
# ("./CommonDefinitions.json#/...", "../../../../../common-types/...") resolve unchanged.
SPEC_BASE = "https://github.com/Azure/azure-rest-api-specs/blob/main/"
_SERVICES = {"specification/app/": "arm", "specification/keyvault/": "vault",
             "specification/operationalinsights/": "logs", "specification/storage/": "files"}
# Inheritance (a source `allOf`) points at a definition's open variant: only the outermost object of an allOf
# chain refuses members it does not know, and it knows the members of the whole chain.
_OPEN = "__open"
_JSON_SERVICES = ("arm", "vault", "logs")

# How Swagger 2.0 is read as JSON Schema draft 4 (a subset of it):
# - An object that lists its properties is closed: a member it does not list is refused, as ACA's RP does
#   (microsoft/azure-container-apps#861) and ARM's deserializer ("Could not find member ..."). An `allOf` chain is
#   one object: the outermost schema knows the members of all its parents, the parents check none themselves.
# - `readOnly: true` members may not be sent; nor may a member whose `x-ms-mutability` lacks the method's verb (PUT
#   and POST: create or update; PATCH: update).
# - Enums: autorest's `x-ms-enum` doc says of `modelAsString: true` "the enum will be modeled as a string. No
#   validation will happen" (Azure/autorest docs/extensions/readme.md): it tells a generated *client* not to refuse
#   values newer than its spec. The service knows its values at an api-version and refuses others, so in requests
#   every enum is closed (triggerType "Sometimes" is refused although TriggerType is modelAsString); in responses a
#   modelAsString: true enum is open and a false one closed.
# - A member that is null counts as absent; `x-nullable` allows null; `format` (int32, date-time, ...) is not checked;
#   a PATCH, a JSON merge patch, need not carry required members.
#
# ARM hands out the URL of a long-running operation's status (Azure-AsyncOperation and Location headers); the
# client follows it as given and no RP spec describes it ("Asynchronous operations", ARM resource provider
# contract). A GET of such a URL under the provider's locations is not refused as an unknown operation.
ARM_OPERATION_POLLS = (
    re.compile(r"^/subscriptions/[^/]+/providers/Microsoft\.App/locations/[^/]+/[^/]*operation[^/]*/[^/]+$",
               re.IGNORECASE),
)


@dataclass(frozen=True)
class Violation:
    """What the spec refuses in a request: the HTTP status, the service's error code and a message naming where."""

    status: int
    code: str
    message: str
    operation: str | None = None  # the spec's operationId, when the request matched one

    def arm_body(self) -> dict[str, Any]:
        """The JSON error body of ARM (also Key Vault's and Log Analytics' shape)."""
        return {"error": {"code": self.code, "message": self.message}}


# ---- codes -------------------------------------------------------------------------------------------------------
# ARM answers a body it cannot deserialize (a wrong type, a missing required property, a member the type does not
# have, a value outside an enum) with 400 InvalidRequestContent, "The request content was invalid and could not be
# deserialized: '<what>. Path '<json path>' ...'" (Microsoft's ACI troubleshooting doc, "The registry credential is
# missing a required property": "Required property 'server' not found in JSON. Path
# 'properties.imageRegistryCredentials[0]'"; Purview's "Could not find member 'cloudConnectors' on object of type
# 'ResourceDefinition'"). ACA's RP refuses unknown members too (microsoft/azure-container-apps#861: "Unknown
# properties eventTriggerConfig ... are not supported"). Values the RP validates after deserializing (read-only,
# mutability, patterns, ranges, parameters) are InvalidParameter; a missing api-version is ARM's
# MissingApiVersionParameter. For a request no operation matches, InvalidResourceType (unknown path) and
# MethodNotAllowed (a known path, another method) are ARM's names for it, not checked against a recorded answer.
# Log Analytics refuses a bad query request with BadArgumentError ("The request had some invalid properties", as
# the azure-monitor-query test recordings show); Key Vault with BadParameter.
_DESERIALIZE = {"type", "required", "x-known", "enum", "additionalProperties"}


def _code(service: str, kind: str) -> str:
    return {
        "arm": {"body": "InvalidRequestContent", "value": "InvalidParameter", "param": "InvalidParameter",
                "api-version": "MissingApiVersionParameter", "path": "InvalidResourceType",
                "method": "MethodNotAllowed"},
        "vault": {"body": "BadParameter", "value": "BadParameter", "param": "BadParameter",
                  "api-version": "BadParameter", "path": "BadParameter", "method": "BadParameter"},
        "logs": {"body": "BadArgumentError", "value": "BadArgumentError", "param": "BadArgumentError",
                 "api-version": "BadArgumentError", "path": "PathNotFoundError", "method": "PathNotFoundError"},
        # Azure Storage's common error codes.
        "files": {"header": "MissingRequiredHeader", "header-value": "InvalidHeaderValue",
                  "query": "MissingRequiredQueryParameter", "query-value": "InvalidQueryParameterValue",
                  "param": "InvalidUri", "path": "InvalidUri", "method": "UnsupportedHttpVerb"},
    }[service][kind]


# ---- loading and shaping the excerpts ----------------------------------------------------------------------------

def _load() -> dict[str, dict]:
    """The excerpts, by the URI of their source file."""
    docs = {}
    for entry in (files("jobs.backends.aca") / "restspec").iterdir():
        if entry.name.endswith(".json"):
            doc = json.loads(entry.read_text(encoding="utf-8"))
            source = doc.pop("_source")
            docs[SPEC_BASE + source["path"]] = doc
    return docs


def _resolve(docs: Mapping[str, dict], base: str, ref: str) -> tuple[str, Any]:
    uri, fragment = urldefrag(urljoin(base, ref))
    node: Any = docs[uri]
    for part in fragment.lstrip("/").split("/") if fragment else ():
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return uri, node


_SUBSCHEMA_MAPS = ("properties", "definitions")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def _children(node: dict) -> Iterator[tuple[str, Any, Any]]:
    """(keyword, key, subschema) for every subschema of a schema node."""
    for kw in _SUBSCHEMA_MAPS:
        for key, sub in (node.get(kw) or {}).items():
            if isinstance(sub, dict):
                yield kw, key, sub
    for kw in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(kw) or ()):
            yield kw, i, sub
    for kw in ("items", "additionalProperties", "not"):
        if isinstance(node.get(kw), dict):
            yield kw, None, node[kw]


def _doc_schemas(doc: dict) -> Iterator[tuple[str, dict]]:
    """(label, root schema) of a document: its definitions, body parameter schemas and response schemas."""
    yield from (doc.get("definitions") or {}).items()
    for p in (doc.get("parameters") or {}).values():
        if isinstance(p.get("schema"), dict):
            yield p["name"], p["schema"]
    for item in {**(doc.get("paths") or {}), **(doc.get("x-ms-paths") or {})}.values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            for p in op.get("parameters") or ():
                if isinstance(p.get("schema"), dict):
                    yield p.get("name", "body"), p["schema"]
            for r in (op.get("responses") or {}).values():
                if isinstance(r.get("schema"), dict):
                    yield op.get("operationId", "response"), r["schema"]


def _walk(node: dict, label: str, fn: Callable[[dict, str], None]) -> None:
    fn(node, label)
    for kw, key, sub in _children(node):
        if kw == "properties":
            _walk(sub, f"{label}.{key}", fn)
        elif kw == "definitions":
            _walk(sub, key, fn)
        else:
            _walk(sub, label, fn)


def _member_names(docs: Mapping[str, dict], base: str, node: dict) -> set[str]:
    names = set(node.get("properties") or {})
    for part in node.get("allOf") or ():
        if "$ref" in part:
            uri, target = _resolve(docs, base, part["$ref"])
            names |= _member_names(docs, uri, target)
        else:
            names |= _member_names(docs, base, part)
    return names


def _close(docs: dict[str, dict]) -> None:
    """Mark every object schema that lists its members: a member it does not know is refused ("x-known")."""
    raw = copy.deepcopy(docs)
    for uri, doc in docs.items():
        def mark(node: dict, label: str, uri=uri) -> None:
            if ("properties" in node or "allOf" in node) and "additionalProperties" not in node:
                # Names come from the untouched copy: marks added here are not members.
                node["x-known"] = {"type": label, "names": sorted(_member_names(raw, uri, node))}

        for label, schema in _doc_schemas(doc):
            _walk(schema, label, mark)


def _open_variants(docs: dict[str, dict]) -> None:
    """A copy of each definition without its own x-known, and inheritance pointed at the copies."""
    for doc in docs.values():
        defs = doc.get("definitions") or {}
        for name in list(defs):
            opened = copy.deepcopy(defs[name])
            opened.pop("x-known", None)
            defs[name + _OPEN] = opened

        def point(node: dict, _label: str) -> None:
            for part in node.get("allOf") or ():
                if "#/definitions/" in part.get("$ref", "") and not part["$ref"].endswith(_OPEN):
                    part["$ref"] += _OPEN

        for label, schema in _doc_schemas(doc):
            _walk(schema, label, point)


def _reshape(node: Any, response: bool) -> Any:
    """Draft-4 forms of what Swagger means: a $ref with siblings keeps them (allOf), x-nullable allows null; for
    responses, objects are open and modelAsString enums extensible."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: _reshape(v, response) for k, v in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [_reshape(v, response) for v in value]
        elif key in ("items", "additionalProperties", "not", "schema") and isinstance(value, dict):
            out[key] = _reshape(value, response)
        else:
            out[key] = value
    if response:
        out.pop("x-known", None)
        if (out.get("x-ms-enum") or {}).get("modelAsString"):
            out.pop("enum", None)
    if "$ref" in out and len(out) > 1:
        # Draft 4 ignores a $ref's siblings; Swagger puts readOnly, x-ms-mutability and descriptions there.
        ref = out.pop("$ref")
        out = {"allOf": [{"$ref": ref}], **out}
    if out.pop("x-nullable", False):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def _reshape_doc(doc: dict, response: bool) -> dict:
    out = dict(doc)
    out["definitions"] = {k: _reshape(v, response) for k, v in (doc.get("definitions") or {}).items()}
    out["parameters"] = {k: _reshape(v, response) for k, v in (doc.get("parameters") or {}).items()}
    for paths_key in ("paths", "x-ms-paths"):
        if paths_key in doc:
            out[paths_key] = {
                path: {m: (_reshape_op(op, response) if isinstance(op, dict) else op) for m, op in item.items()}
                for path, item in doc[paths_key].items()}
    return out


def _reshape_op(op: dict, response: bool) -> dict:
    out = dict(op)
    if "parameters" in op:
        out["parameters"] = [_reshape(p, response) for p in op["parameters"]]
    if "responses" in op:
        out["responses"] = {c: _reshape(r, response) for c, r in op["responses"].items()}
    return out


# ---- validators --------------------------------------------------------------------------------------------------

def _read_only(validator, value, instance, schema):
    if value is True:
        yield ValidationError("is read-only: the service sets it, a request must not send it")


def _mutability(may: frozenset[str], verb: str):
    def check(validator, value, instance, schema):
        if not may & set(value):
            yield ValidationError(f"cannot be sent in a {verb} (x-ms-mutability: {', '.join(value)})")

    return check


def _known(validator, known, instance, schema):
    if validator.is_type(instance, "object"):
        for key in instance:
            if key not in known["names"]:
                yield ValidationError(f"Could not find member '{key}' on object of type '{known['type']}'",
                                      path=[key])


def _not_required(validator, required, instance, schema):
    # A JSON merge patch (RFC 7396) sends only what changes; a required member may be absent from it.
    return ()


_BASE_KEYWORDS = {"readOnly": _read_only, "x-known": _known}
_PUT = validators.extend(Draft4Validator, {**_BASE_KEYWORDS,
                                           "x-ms-mutability": _mutability(frozenset({"create", "update"}), "PUT")})
_PATCH = validators.extend(Draft4Validator, {**_BASE_KEYWORDS, "required": _not_required,
                                             "x-ms-mutability": _mutability(frozenset({"update"}), "PATCH")})
# A response may carry null where a client treats the member as absent (Log Analytics' rows hold nulls:
# examples/oms-post-example.json).
_DRAFT4_TYPES = Draft4Validator.TYPE_CHECKER
_NULLABLE = _DRAFT4_TYPES.redefine_many({
    name: (lambda checker, instance, name=name: instance is None or _DRAFT4_TYPES.is_type(instance, name))
    for name in ("array", "boolean", "integer", "number", "object", "string")})
_RESPONSE = validators.extend(Draft4Validator, type_checker=_NULLABLE)


# ---- the operations ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Operation:
    service: str
    method: str
    template: str
    operation_id: str
    pattern: re.Pattern
    names: tuple[str, ...]
    fixed_query: tuple[tuple[str, str], ...]  # Files: the restype/comp an x-ms-path names
    doc_uri: str
    parameters: tuple[tuple[str, dict], ...]  # (base uri, parameter), refs resolved, operation's over the path's
    op: dict


def _path_regex(service: str, template: str) -> tuple[re.Pattern, tuple[str, ...]]:
    names, parts = [], []
    segments = template.strip("/").split("/")
    for i, seg in enumerate(segments):
        m = re.fullmatch(r"\{([^}]+)\}", seg)
        if not m:
            parts.append("/" + re.escape(seg))
            continue
        names.append(m.group(1))
        if service == "files" and m.group(1) == "directory":
            parts.append("(?:/(.+?))?")  # any depth, the share's root too
        elif service == "vault" and m.group(1) == "secret-version" and i == len(segments) - 1:
            parts.append("/([^/]*)")  # "This URI fragment is optional. If not specified, the latest version"
        else:
            parts.append("/([^/]+)")
    tail = "/?" if service == "files" else ""
    flags = re.IGNORECASE if service == "arm" else 0  # ARM URLs are case-insensitive
    return re.compile("^" + "".join(parts) + tail + "$", flags), tuple(names)


def _parameters(docs, uri: str, item: dict, op: dict) -> tuple[tuple[str, dict], ...]:
    merged: dict[tuple[str, str], tuple[str, dict]] = {}
    for p in list(item.get("parameters") or ()) + list(op.get("parameters") or ()):
        base = uri
        if "$ref" in p:
            base, p = _resolve(docs, uri, p["$ref"])
        merged[(p["name"].lower(), p["in"])] = (base, p)
    return tuple(merged.values())


@dataclass
class _Spec:
    docs: dict[str, dict]  # the excerpts as copied
    operations: dict[str, list[_Operation]]
    registries: dict[str, Registry]
    validators: dict[tuple[str, str], Any]
    param_validators: dict[int, Draft4Validator]


@cache
def _spec() -> _Spec:
    raw = _load()
    closed = copy.deepcopy(raw)
    _close(closed)
    _open_variants(closed)
    registries = {}
    for mode, response in (("request", False), ("response", True)):
        registries[mode] = Registry().with_resources(
            (uri, DRAFT4.create_resource(_reshape_doc(doc, response))) for uri, doc in closed.items())
    ops: dict[str, list[_Operation]] = {s: [] for s in _SERVICES.values()}
    for uri, doc in raw.items():
        service = next((s for prefix, s in _SERVICES.items() if uri.startswith(SPEC_BASE + prefix)), None)
        if service is None:
            continue
        base_path = doc.get("basePath", "").rstrip("/")
        for key, item in {**(doc.get("paths") or {}), **(doc.get("x-ms-paths") or {})}.items():
            template, _, query = key.partition("?")
            fixed = tuple(tuple(kv.split("=", 1)) for kv in query.split("&") if "=" in kv)
            pattern, names = _path_regex(service, base_path + template)
            for method, op in item.items():
                if method == "parameters":
                    continue
                ops[service].append(_Operation(
                    service, method.upper(), base_path + key, op["operationId"], pattern, names, fixed, uri,
                    _parameters(raw, uri, item, op), op))
    return _Spec(raw, ops, registries, {}, {})


def covered_operations() -> dict[str, list[str]]:
    """The spec operations the excerpts hold, by service."""
    return {s: sorted({op.operation_id for op in ops}) for s, ops in _spec().operations.items()}


def _find(service: str, method: str, path: str, query: Mapping[str, str]
          ) -> tuple[_Operation | None, dict[str, str], bool]:
    """The operation of a request, its path values, and whether any operation has this path (another method)."""
    spec = _spec()
    if service == "files":
        path = "/" + path.lstrip("/").partition("/")[2]  # the account's name leads the stand-in's paths
    discriminators = {k: v for k, v in query.items() if k in ("restype", "comp")}
    path_known = False
    for op in spec.operations[service]:
        m = op.pattern.match(path)
        if not m or (service == "files" and dict(op.fixed_query) != discriminators):
            continue
        path_known = True
        if op.method == method.upper():
            return op, {n: v for n, v in zip(op.names, m.groups()) if v is not None}, True
    return None, {}, path_known


# ---- checking ------------------------------------------------------------------------------------------------------

def check_request(service: str, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
                  body: Any) -> Violation | None:
    """What the spec refuses in this request, or None. `service` is "arm", "vault", "files" or "logs"; `path` is
    the URL path as the stand-in sees it (Files: /{account}/{share}/...; Log Analytics: /v1/...); `body` the parsed
    JSON, None for none (ignored for Files, whose bodies are bytes). Call it after authentication: Key Vault's client
    first sends a request with no token and no body to get the 401 challenge."""
    if service not in _JSON_SERVICES + ("files",):
        raise ValueError(f"unknown service {service!r}")
    op, values, path_known = _find(service, method, path, query)
    if op is None:
        if service == "arm" and method.upper() == "GET" and any(p.match(path) for p in ARM_OPERATION_POLLS):
            return None
        where = f"{method.upper()} {path}" + (f"?{_query_text(query)}" if service == "files" and query else "")
        return Violation(400, _code(service, "method" if path_known else "path"),
                         f"The spec has no such operation: {where} matches no operation of the {service} REST spec "
                         f"excerpts (jobs/backends/aca/restspec).")
    lowered = {k.lower(): v for k, v in headers.items()}
    for base, param in op.parameters:
        problem = _check_parameter(op, base, param, values, query, lowered, body)
        if problem:
            return problem
    return None


def _query_text(query: Mapping[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in query.items())


def _check_parameter(op: _Operation, base: str, param: dict, values: Mapping[str, str], query: Mapping[str, str],
                     headers: Mapping[str, str], body: Any) -> Violation | None:
    where, name, required = param["in"], param["name"], bool(param.get("required"))
    if where == "body":
        if op.service not in _JSON_SERVICES:
            return None  # Files bodies are bytes
        if body is None:
            return _violation(op, "body", f"The request body ('{name}') is required.") if required else None
        return _check_body(op, base, param["schema"], body)
    if where == "header":
        if param.get("x-ms-header-collection-prefix"):
            return None  # x-ms-meta-*: free-form
        value = headers.get(name.lower())
        label = f"header '{name}'"
    elif where == "query":
        value = query.get(name)
        label = f"query parameter '{name}'"
    else:  # path
        value = values.get(name)
        if value == "" and name == "secret-version":
            return None  # the latest version
        if value is None and op.service == "files" and name == "directory":
            return None  # the share's root
        label = f"path segment '{name}'"
    if value is None:
        if not required:
            return None
        if name == "api-version":
            return _violation(op, "api-version", "The api-version query parameter (?api-version=) is required for "
                                                 "all requests.")
        kind = {"header": "header", "query": "query"}.get(where, "param")
        return _violation(op, kind, f"The {label} is required by {op.operation_id} and is missing.")
    problem = _parameter_problem(param, value)
    if problem:
        kind = {"header": "header-value", "query": "query-value"}.get(where, "param")
        return _violation(op, kind, f"The {label} is not valid: {problem}.")
    return None


def _violation(op: _Operation, kind: str, message: str) -> Violation:
    service = op.service
    if service != "files":
        kind = {"header": "param", "query": "param", "header-value": "param", "query-value": "param"}.get(kind, kind)
    return Violation(400, _code(service, kind), message, op.operation_id)


_SCALARS = ("type", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
            "maxLength", "items", "minItems", "maxItems", "uniqueItems")


def _coerce(param: Mapping[str, Any], value: str) -> Any:
    kind = param.get("type")
    if kind == "integer":
        return int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else value
    if kind == "number":
        try:
            return float(value)
        except ValueError:
            return value
    if kind == "boolean":
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    if kind == "array":
        sep = {"csv": ",", "ssv": " ", "tsv": "\t", "pipes": "|"}.get(param.get("collectionFormat", "csv"), ",")
        return [_coerce(param.get("items") or {}, v) for v in value.split(sep)]
    return value


def _parameter_problem(param: dict, value: str) -> str:
    spec = _spec()
    validator = spec.param_validators.get(id(param))
    if validator is None:
        validator = Draft4Validator({k: param[k] for k in _SCALARS if k in param})
        spec.param_validators[id(param)] = validator
    error = best_match(validator.iter_errors(_coerce(param, value)))
    return _detail(error) if error else ""


def _without_nulls(value: Any) -> Any:
    """A member that is null counts as absent, as Azure's services and SDKs take it: azure-monitor-query sends
    "workspaces": null with a one-workspace query, and ARM's own merge patch (RFC 7396) removes with null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _check_body(op: _Operation, base: str, schema: dict, body: Any) -> Violation | None:
    errors = list(_body_validator(op.method, base, schema).iter_errors(_without_nulls(body)))
    if not errors:
        return None
    error = best_match(errors)
    where = _json_path(error.absolute_path)
    more = f" ({len(errors) - 1} more problem{'s' * (len(errors) > 2)} in the body)" if len(errors) > 1 else ""
    if error.validator in _DESERIALIZE:
        if op.service == "arm":
            message = (f"The request content was invalid and could not be deserialized: '{_detail(error)}. "
                       f"Path '{where}'.'{more}")
        else:
            message = f"The request body is not valid: {_detail(error)} at '{where}'{more}."
        return _violation(op, "body", message)
    if error.validator in ("readOnly", "x-ms-mutability"):
        return _violation(op, "value", f"The property '{where}' {error.message}{more}.")
    return _violation(op, "value", f"The property '{where}' is not valid: {_detail(error)}{more}.")


def _body_validator(method: str, base: str, schema: dict):
    spec = _spec()
    target = urljoin(base, schema["$ref"]) if "$ref" in schema else None
    key = ("PATCH" if method.upper() == "PATCH" else "PUT", target or json.dumps(schema, sort_keys=True))
    validator = spec.validators.get(key)
    if validator is None:
        cls = _PATCH if key[0] == "PATCH" else _PUT
        root = {"$ref": target} if target else _reshape(schema, False)
        validator = cls(root, registry=spec.registries["request"])
        spec.validators[key] = validator
    return validator


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_$][\w$]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"['{part}']"
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _detail(error: ValidationError) -> str:
    kw, expected, instance = error.validator, error.validator_value, error.instance
    if kw == "required":
        missing = [r for r in expected if isinstance(instance, dict) and r not in instance]
        return f"Required property '{missing[0] if missing else expected[0]}' not found in JSON"
    if kw == "type":
        return f"{_short(instance)} is not of type '{expected}'"
    if kw == "enum":
        return f"{_short(instance)} is not one of {json.dumps(expected)}"
    if kw == "pattern":
        return f"{_short(instance)} does not match the pattern '{expected}'"
    return error.message


# ---- responses ---------------------------------------------------------------------------------------------------

def check_response(service: str, method: str, path: str, status: int, body: Any,
                   query: Mapping[str, str] | None = None) -> Violation | None:
    """Whether a JSON answer fits the operation's response schema for `status` (or its default). Objects are open
    and modelAsString enums extensible here: a service may add members and values that clients must accept. None
    where the spec describes no body for the status, or the excerpts do not hold the response's definition."""
    if service not in _JSON_SERVICES:
        raise ValueError(f"responses of {service!r} are not JSON")
    op, _, _ = _find(service, method, path, query or {})
    if op is None:
        return Violation(500, "OperationNotInSpec", f"{method.upper()} {path} matches no spec operation.")
    responses = op.op.get("responses") or {}
    schema = (responses.get(str(status)) or responses.get("default") or {}).get("schema")
    if not schema or "$ref" not in schema:
        return None
    spec = _spec()
    target = urljoin(op.doc_uri, schema["$ref"])
    try:
        _resolve(spec.docs, op.doc_uri, schema["$ref"])
    except KeyError:
        return None
    validator = spec.validators.get(("response", target))
    if validator is None:
        validator = _RESPONSE({"$ref": target}, registry=spec.registries["response"])
        spec.validators[("response", target)] = validator
    errors = list(validator.iter_errors(body))
    if not errors:
        return None
    error = best_match(errors)
    return Violation(500, "ResponseNotInSpec",
                     f"The {op.operation_id} response ({status}) does not fit the spec: {_detail(error)} at "
                     f"'{_json_path(error.absolute_path)}'.", op.operation_id)

