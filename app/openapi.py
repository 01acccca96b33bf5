"""The OpenAPI document: FastAPI's, completed so that it says exactly what this server does.

Routes document their own answers (``response_model``, ``responses``). What no single route
knows is added here, once, when the document is first asked for:

- every 4xx/5xx is the error envelope (``ErrorResponse``): FastAPI's ``HTTPValidationError``
  422 is replaced, and the answers every route can give are added: 500 everywhere; 401 on routes
  behind the bearer scheme, 403 where a scope is required; 408, 413 and 503 (upload guard) where
  a body is read; ``X-Request-ID`` on every response;
- multipart form fields are never ``null`` (a form leaves an optional field out instead);
- the server's own facts fill the marked fields (``x-unbox-fill``): its job methods (plug-ins
  from ``UNBOX_JOB_METHOD_MODULES`` included), its catalogue's models, the largest class index,
  the synchronous Score-CAM channel cap;
- the job result union keeps only the registered methods, plus ``PluginJobResult`` for plug-ins;
- ``webhooks`` declares the job-end event with its Standard Webhooks headers.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Callable, Iterator

from fastapi import FastAPI, Header
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts

from app.job_schemas import JobEvent
from app.schemas import ERROR_STATUSES, error_responses, header
from models.labels import load_labels
from workers.methods import load_builtin_methods

SCHEMAS = "#/components/schemas/"
ERROR_REF = {"$ref": SCHEMAS + "ErrorResponse"}
REQUEST_ID = {"X-Request-ID": header("the request's id (the client's own when it sent a plain token), also in "
                                     "the server's logs")}
FILL = "x-unbox-fill"
SIGNATURE_PATTERN = r"^v1,[A-Za-z0-9+/]+=*( v1,[A-Za-z0-9+/]+=*)*$"


def install_openapi(app: FastAPI) -> None:
    """Declare the webhooks and serve :func:`build_document` (built once) as ``app.openapi()``."""
    _declare_webhooks(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for ``app``, completed as the module docstring says."""
    document = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                           routes=app.routes, webhooks=app.webhooks.routes, tags=app.openapi_tags,
                           servers=app.servers)
    facts = _route_facts(app)
    for (path, verb), operation in _operations(document.get("paths", {})):
        _complete_responses(operation, facts.get((path, verb.upper()), {}))
    for operation in (op for item in document.get("webhooks", {}).values() for op in item.values()):
        operation["responses"] = {"2XX": {"description": "received: any 2xx ends the delivery; another status, "
                                          "or none within the timeout, is retried with exponential backoff"}}
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _forms_without_null(document)
    methods = sorted(load_builtin_methods(app.state.settings.job_method_modules))
    _fill(document, _fillers(app, methods))
    _fit_job_results(schemas, methods)
    return document


# ----- per-operation answers ------------------------------------------------------------------
def _operations(paths: dict[str, Any]) -> Iterator[tuple[tuple[str, str], dict[str, Any]]]:
    for path, item in paths.items():
        for verb, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation:
                yield (path, verb), operation


def _route_facts(app: FastAPI) -> dict[tuple[str, str], dict[str, Any]]:
    """Per ``(path, METHOD)``: whether the route reads a body and which scope it requires."""
    facts: dict[tuple[str, str], dict[str, Any]] = {}
    for route in iter_route_contexts(app.routes):  # routers included into the app, flattened
        if not isinstance(route.original_route, APIRoute):
            continue
        scopes = [_required_scope(dependency.call) for dependency in _dependencies(route.dependant)]
        for verb in route.methods or ():
            facts[(route.path_format, verb)] = {"body": route.body_field is not None,
                                                "scoped": any(scope is not None for scope in scopes)}
    return facts


def _dependencies(dependant: Any) -> Iterator[Any]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from _dependencies(dependency)


def _required_scope(call: Callable[..., Any] | None) -> str | None:
    """The scope an ``app.auth.require(scope)`` dependency checks (``None`` for other callables):
    the ``scope`` its closure holds. tests/test_contract.py notices if that stops being true."""
    if call is None or not inspect.isfunction(call):
        return None
    scope = inspect.getclosurevars(call).nonlocals.get("scope")
    return scope if isinstance(scope, str) else None


def _complete_responses(operation: dict[str, Any], facts: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation["responses"]
    if _cannot_fail_validation(operation):
        responses.pop("422", None)
    added: list[int] = [500]
    if operation.get("security"):
        added.append(401)
        if facts.get("scoped"):
            added.append(403)
    if facts.get("body"):
        added += [408, 413, 503]
    documented = error_responses(*added)
    for status, answer in documented.items():
        if str(status) not in responses:
            responses[str(status)] = {"description": answer["description"],
                                      "content": {"application/json": {"schema": dict(ERROR_REF)}},
                                      **({"headers": answer["headers"]} if "headers" in answer else {})}
    for status, answer in responses.items():
        if status[0] in "45":
            _as_error(int(status), answer)
        answer.setdefault("headers", {}).update(REQUEST_ID)


def _as_error(status: int, answer: dict[str, Any]) -> None:
    """The envelope for an error answer (replacing FastAPI's HTTPValidationError), with its headers;
    an answer with a body of its own (``/readyz``'s 503) is left as it is."""
    description, headers = ERROR_STATUSES.get(status, (answer.get("description", "error"), {}))
    schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
    if schema.get("$ref", "").endswith("/HTTPValidationError") or not schema:
        answer["content"] = {"application/json": {"schema": dict(ERROR_REF)}}
        answer["description"] = description
    if answer["content"]["application/json"]["schema"] == ERROR_REF:
        for name, value in headers.items():
            answer.setdefault("headers", {}).setdefault(name, value)


def _cannot_fail_validation(operation: dict[str, Any]) -> bool:
    """No body and only plain string path parameters: FastAPI's own 422 cannot happen."""
    return "requestBody" not in operation and all(
        parameter["in"] == "path" and parameter.get("schema", {}).get("type") == "string"
        for parameter in operation.get("parameters", []))


# ----- form bodies ----------------------------------------------------------------------------
def _forms_without_null(document: dict[str, Any]) -> None:
    """Optional multipart fields are left out, never sent as null: drop their null branch."""
    schemas = document["components"]["schemas"]
    for _, operation in _operations(document.get("paths", {})):
        for media, content in operation.get("requestBody", {}).get("content", {}).items():
            ref = content.get("schema", {}).get("$ref", "")
            if media.startswith("multipart/") and ref.startswith(SCHEMAS):
                for name, field in schemas[ref[len(SCHEMAS):]].get("properties", {}).items():
                    branches = field.get("anyOf")
                    if branches and {"type": "null"} in branches:
                        rest = [branch for branch in branches if branch != {"type": "null"}]
                        field.pop("anyOf")
                        if field.get("default", 0) is None:
                            field.pop("default")
                        if len(rest) == 1:
                            field.update({**rest[0], **field})
                        else:
                            field["anyOf"] = rest


# ----- the server's facts ---------------------------------------------------------------------
def _fillers(app: FastAPI, methods: list[str]) -> dict[str, Callable[[dict[str, Any]], None]]:
    settings, registry = app.state.settings, app.state.service.registry
    models = sorted(registry.specs)
    classes = max((len(load_labels(spec.labels)) for spec in registry.specs.values()), default=1)

    def channels(node: dict[str, Any]) -> None:
        for branch in node.get("anyOf", [node]):
            if branch.get("type") == "integer":
                branch["maximum"] = settings.sync_scorecam_max_channels

    return {
        "job_methods": lambda node: node.update(enum=methods),
        "models": lambda node: node.update(enum=models),
        "class_index": lambda node: node.update(maximum=classes - 1),
        "scorecam_channels": channels,
    }


def _fill(node: Any, fillers: dict[str, Callable[[dict[str, Any]], None]]) -> None:
    if isinstance(node, dict):
        kind = node.pop(FILL, None)
        if kind is not None:
            fillers[kind](node)
        for value in node.values():
            _fill(value, fillers)
    elif isinstance(node, list):
        for value in node:
            _fill(value, fillers)


def _fit_job_results(schemas: dict[str, Any], methods: list[str]) -> None:
    """Keep the registered methods in the result union; plug-ins share ``PluginJobResult``."""
    union = schemas.get("JobResult")
    if union is None:
        return
    mapping: dict[str, str] = union["discriminator"]["mapping"]
    plugins = [name for name in methods if name not in mapping]
    for name in [name for name in mapping if name not in methods]:
        del mapping[name]
    union["oneOf"] = [member for member in union["oneOf"] if member["$ref"] in mapping.values()]
    for member in union["oneOf"]:
        field = schemas[member["$ref"][len(SCHEMAS):]]["properties"]["method"]
        if "enum" in field:
            field["enum"] = [name for name in field["enum"] if name in methods]
    if plugins:
        schemas["PluginJobResult"] = {
            "title": "PluginJobResult", "type": "object", "required": ["method"], "additionalProperties": True,
            "description": "the result of a plug-in method (UNBOX_JOB_METHOD_MODULES): whatever it returns, "
                           "with its pictures inline or behind links like the built-in ones",
            "properties": {"method": {"type": "string", "enum": plugins}}}
        union["oneOf"].append({"$ref": SCHEMAS + "PluginJobResult"})
        mapping.update({name: SCHEMAS + "PluginJobResult" for name in plugins})


# ----- webhooks -------------------------------------------------------------------------------
def _declare_webhooks(app: FastAPI) -> None:
    @app.webhooks.post("job.ended", tags=["jobs"])
    def job_ended(
        event: JobEvent,
        webhook_id: Annotated[str, Header(alias="webhook-id", description=(
            "the event's id (msg_...), the same for every attempt: deduplicate on it"))],
        webhook_timestamp: Annotated[int, Header(alias="webhook-timestamp", description=(
            "Unix seconds of this attempt; refuse ones far from your clock (replays)"))],
        webhook_signature: Annotated[str, Header(alias="webhook-signature", pattern=SIGNATURE_PATTERN, description=(
            "space-separated v1,<base64 HMAC-SHA256 of '{webhook-id}.{webhook-timestamp}.{body}'> keyed by "
            "UNBOX_WEBHOOK_SECRET (the base64 after whsec_, else the secret's bytes)"))],
    ) -> None:
        """Sent (signed, Standard Webhooks) to a job's ``callback_url`` once the job has ended:
        ``data`` is the job's view without its result (GET ``data.links.self`` for that)."""
