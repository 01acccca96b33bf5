"""The OpenAPI contract: the document says what the service does, and the service keeps to it.

Two parts. In process (no server): the document built by ``create_app`` has a typed answer for
every route, the error envelope for every error, no FastAPI validation schemas, ``/metrics`` as
text, the webhook, the bearer scheme and the job result union. Over HTTP: a bounded schemathesis
run against a real stack (Redis, one worker, the API with API keys on, a tiny model), with the
checks not_a_server_error, status_code_conformance, content_type_conformance,
response_schema_conformance and positive_data_acceptance; then real jobs of every kind and their
webhook checked against the same document.

What a schema cannot say is settled per case before it is sent (``_settle``): the upload is a
real PNG (arbitrary bytes are a 400/415, documented, but would test nothing else), a ``layer``
must be one of the model's modules, ``channels`` only goes with scorecam, ``params`` depends
on the method, ``callback_url`` must resolve to an allowed address, an ``Idempotency-Key`` is
single-use per request.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema_rs  # schemathesis's own validator (JSON Schema 2020-12)
import pytest
import schemathesis
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, positive_data_acceptance,
                                               response_schema_conformance, status_code_conformance)

from tests.queue_support import REPO, TERMINAL, WebhookReceiver, running_stack

ERROR_REF = "#/components/schemas/ErrorResponse"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          positive_data_acceptance]
# A schema-valid request may still meet the caller's limits or an unknown id; nothing else.
ACCEPTED = ["2xx", "401", "403", "404", "409", "429", "503"]
EXAMPLES = 8  # per operation and generation mode, for the operations that compute something
COSTLY_PATHS = {"/v1/predict", "/v1/explain", "/v1/jobs"}
CONFIG = {
    "seed": 18,
    "generation": {"deterministic": True, "with-security-parameters": False},
    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
}
JOB_PARAMS = {  # cheap, valid params per job method (the schema of params depends on the method)
    "igos": {"preset": "cpu", "iterations": 1, "steps": 1, "metric_steps": 4},
    "igos++": {"preset": "cpu", "iterations": 1, "steps": 1, "metric_steps": 4},
    "sag": {"grid": 2, "max_roots": 1, "max_root_size": 2, "graph_roots": 1, "max_nodes": 4, "ordering": "gradcam"},
    "scorecam": {"channels": 4},
    "slow": {"steps": 1, "step_s": 0},
    "slow_2s_limit": {"steps": 1, "step_s": 0},
}


STUDY_SPEC = {"models": ["tiny"], "methods": [{"name": "gradcam"}], "analyses": {"regions": {}, "faithfulness": {"steps": 2}}}


def study_zip() -> bytes:
    """A one-image study archive with a manifest giving a region (what the schema cannot say)."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.csv", "path,region\nphoto.png,0 0 20 16\n")
        archive.writestr("photo.png", png())
    return buffer.getvalue()


def png(size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


# ----- the document, in process ------------------------------------------------------------------
@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    from app.main import create_app
    from app.settings import Settings

    return create_app(Settings()).openapi()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for verb, operation in item.items():
            yield path, verb.upper(), operation


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_route_has_a_typed_success_answer(document: dict[str, Any]) -> None:
    expected = {("POST", "/v1/predict"), ("POST", "/v1/explain"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
                ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/methods"),
                ("GET", "/v1/workers"), ("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/readyz"),
                ("GET", "/metrics"), ("GET", "/v1/jobs/{job_id}/files/{name}"),
                ("GET", "/v1/jobs/{job_id}/result.png")}
    assert expected <= {(verb, path) for path, verb, _ in _operations(document)}
    for path, verb, operation in _operations(document):
        successes = {status: answer for status, answer in operation["responses"].items() if status[0] == "2"}
        assert successes, f"{verb} {path}"
        for status, answer in successes.items():
            assert answer.get("content"), f"{verb} {path} {status} has no body schema"
            for media, content in answer["content"].items():
                assert content.get("schema"), f"{verb} {path} {status} {media}"
                assert content["schema"] != {}, f"{verb} {path} {status} {media}"
        for status, answer in successes.items():
            assert "X-Request-ID" in answer.get("headers", {}), f"{verb} {path} {status}"
    submitted = document["paths"]["/v1/jobs"]["post"]["responses"]["202"]
    assert {"Location", "Retry-After", "Idempotent-Replayed"} <= set(submitted["headers"])
    assert submitted["content"]["application/json"]["schema"]["$ref"].endswith("/JobSubmitted")
    listing = document["paths"]["/v1/jobs"]["get"]["responses"]["200"]["content"]["application/json"]
    assert listing["schema"]["$ref"].endswith("/JobListResponse")
    explain = document["paths"]["/v1/explain"]["post"]["responses"]["200"]["content"]
    assert set(explain) == {"application/json", "image/png"}


def test_every_error_answer_is_the_envelope(document: dict[str, Any]) -> None:
    for path, verb, operation in _operations(document):
        for status, answer in operation["responses"].items():
            if status[0] not in "45":
                continue
            schema = answer["content"]["application/json"]["schema"]
            if (path, status) == ("/readyz", "503"):  # not ready: the readiness body, like the 200
                assert schema["$ref"].endswith("/ReadyResponse")
                continue
            assert schema == {"$ref": ERROR_REF}, f"{verb} {path} {status}"
            assert "X-Request-ID" in answer["headers"]
            if status in ("429", "503"):
                assert "Retry-After" in answer["headers"], f"{verb} {path} {status}"
            if status in ("401", "403"):
                assert "WWW-Authenticate" in answer["headers"]
        responses = operation["responses"]
        assert "500" in responses, f"{verb} {path}"
        if operation.get("security"):
            assert "401" in responses, f"{verb} {path}"
        if "requestBody" in operation:
            assert {"408", "413", "503"} <= set(responses), f"{verb} {path}"
    assert "403" in document["paths"]["/v1/predict"]["post"]["responses"]  # require("predict")
    assert "403" not in document["paths"]["/v1/models"]["get"]["responses"]  # require(): any key
    assert "422" not in document["paths"]["/v1/jobs/{job_id}/result.png"]["get"]["responses"]  # nothing to refuse
    limited = document["paths"]["/v1/predict"]["post"]["responses"]["429"]["headers"]
    assert {"RateLimit", "RateLimit-Policy", "Retry-After"} <= set(limited)


def test_no_fastapi_validation_schemas_and_no_dangling_refs(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert "HTTPValidationError" not in json.dumps(document)
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    assert "x-unbox-fill" not in json.dumps(document)


def test_metrics_is_prometheus_text(document: dict[str, Any]) -> None:
    answer = document["paths"]["/metrics"]["get"]["responses"]["200"]
    assert set(answer["content"]) == {"text/plain"}


def test_the_job_end_webhook_is_declared(document: dict[str, Any]) -> None:
    operation = document["webhooks"]["job.ended"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/JobEvent")
    assert {p["name"] for p in operation["parameters"] if p["in"] == "header"} == {
        "webhook-id", "webhook-timestamp", "webhook-signature"}
    event = document["components"]["schemas"]["JobEvent"]
    assert set(event["properties"]["type"]["enum"]) == {"job.succeeded", "job.failed", "job.canceled"}
    assert event["properties"]["data"]["$ref"].endswith("/JobSummary")
    assert "result" not in document["components"]["schemas"]["JobSummary"]["properties"]


def test_the_job_result_is_a_union_discriminated_by_method(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    result = schemas["JobView"]["properties"]["result"]
    assert {"$ref": "#/components/schemas/JobResult"} in result["anyOf"]
    union = schemas["JobResult"]
    assert union["discriminator"]["propertyName"] == "method"
    from explainers.registry import METHODS

    # every registered method is a job method with a built-in result model (plug-ins have theirs)
    mapping = union["discriminator"]["mapping"]
    assert {"gradcam", "scorecam", "cam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "rollout",
            "igos", "igos++", "sag"} == set(METHODS) <= set(mapping)
    assert {mapping[name] for name in METHODS} <= {"#/components/schemas/CamJobResult",
                                                   "#/components/schemas/IgosJobResult",
                                                   "#/components/schemas/SagJobResult"}
    members = {ref["$ref"].rsplit("/", 1)[1] for ref in union["oneOf"]}
    assert {"CamJobResult", "IgosJobResult", "SagJobResult"} <= members
    for name in ("CamJobResult", "IgosJobResult", "SagJobResult"):
        assert "method" in schemas[name]["required"]


def test_the_document_names_this_servers_methods_models_and_scheme(document: dict[str, Any]) -> None:
    from explainers.registry import SYNCHRONOUS
    from workers.methods import load_builtin_methods

    body = document["components"]["schemas"]["Body_submit_job_v1_jobs_post"]["properties"]
    assert set(body["method"]["enum"]) == set(load_builtin_methods())
    assert "efficientnet_lite0" in body["model"]["enum"]
    assert body["target"] == {**body["target"], "type": "integer", "minimum": 0, "maximum": 999}
    explain = document["components"]["schemas"]["Body_explain_v1_explain_post"]["properties"]
    assert explain["method"]["enum"] == list(SYNCHRONOUS)
    assert all("null" not in json.dumps(field) for field in explain.values())  # a form leaves fields out
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        **document["components"]["securitySchemes"]["ApiKey"], "type": "http", "scheme": "bearer"}


def test_plugin_methods_join_the_enums_and_the_union() -> None:
    from app.main import create_app
    from app.settings import Settings

    document = create_app(Settings(job_method_modules=["tests.queue_support"])).openapi()
    schemas = document["components"]["schemas"]
    mapping = schemas["JobResult"]["discriminator"]["mapping"]
    assert mapping["no_picture"] == mapping["slow"] == "#/components/schemas/PluginJobResult"
    assert {"slow", "boom", "no_picture"} <= set(schemas["PluginJobResult"]["properties"]["method"]["enum"])
    body = schemas["Body_submit_job_v1_jobs_post"]["properties"]
    assert {"slow", "boom", "no_picture", "gradcam"} <= set(body["method"]["enum"])


# ----- the running service, over HTTP ------------------------------------------------------------
def _new_key(keys_file: Path) -> str:
    """A key with every scope, made with the CLI (the key is its last line of output)."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "keys", "add", "contract", "--scopes",
                           "predict,explain,jobs,admin"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "UNBOX_API_KEYS_FILE": str(keys_file)})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    hooks = WebhookReceiver()
    yield hooks
    hooks.close()


@pytest.fixture(scope="module")
def contract_stack(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("contract")
    keys_file = folder / "keys.toml"
    key = _new_key(keys_file)
    env = {"UNBOX_API_KEYS_FILE": str(keys_file), "UNBOX_RATE_LIMIT_PER_MINUTE": "0",
           "UNBOX_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
           "UNBOX_SYNC_SCORECAM_MAX_CHANNELS": "512",  # resnet18's layer4: channels=all is then affordable
           "UNBOX_JOB_INLINE_PICTURE_MAX_BYTES": "200"}  # some pictures go behind links
    with running_stack(artifacts, folder, "contract", workers=1, env=env) as stack:
        stack.key = key
        yield stack


@pytest.fixture(scope="module")
def api_schema(contract_stack: Any) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(CONFIG)
    return schemathesis.openapi.from_url(contract_stack.url + "/openapi.json", config=config)


def _settle(case: schemathesis.Case, receiver_url: str, layers: dict[str, str | None]) -> None:
    """Replace what the schema cannot constrain with valid values (positive cases only)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return
    body = case.body
    if "image" in body:
        body["image"] = png()
    layer = layers.get(body.get("model", "efficientnet_lite0"))
    if "layer" in body and layer:
        body["layer"] = layer  # the model's own default layer (valid layers depend on the model)
    elif "layer" in body:
        del body["layer"]
    body.pop("window", None)  # a window suits greyscale uploads, a frame multi-frame DICOM: not this PNG
    body.pop("frame", None)
    if case.path == "/v1/explain" and body.get("method", "gradcam") != "scorecam":
        body.pop("channels", None)
    if case.path == "/v1/explain" and body.get("method") == "rollout":  # attention rollout: a ViT, no layer
        body["model"] = "tiny_vit"
        body.pop("layer", None)
    if case.path == "/v1/studies":
        body["archive"] = study_zip()
        body["spec"] = json.dumps(STUDY_SPEC)
    if case.path == "/v1/jobs":
        body["params"] = json.dumps(JOB_PARAMS.get(body["method"], {}))
        if "callback_url" in body:
            body["callback_url"] = receiver_url
        if case.headers and "Idempotency-Key" in case.headers:
            case.headers["Idempotency-Key"] = uuid.uuid4().hex


def test_the_running_service_keeps_its_contract(api_schema: schemathesis.BaseSchema, contract_stack: Any,
                                                receiver: WebhookReceiver) -> None:
    """Every operation, positive and negative data, a few examples each; all failures reported.

    (Driven through ``as_strategy`` rather than ``schemathesis.pytest.from_fixture``, whose lazy
    loader does not run under pytest 9.)"""
    models = _call_and_validate(api_schema["/v1/models"]["GET"].Case(), contract_stack).json()["models"]
    layers = {model["name"]: model["target_layer"] for model in models}
    failures: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        examples = EXAMPLES if operation.path in COSTLY_PATHS else 2 if operation.path.startswith("/v1/studies") \
            else 4  # the others answer from Redis (a study's items also keep the one worker busy)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                                 phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                _settle(case, receiver.url, layers)
                _call_and_validate(case, contract_stack)

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing to get wrong (no parameters, no body): no negative case exists
            except BaseException as exc:  # schemathesis's FailureGroup is a BaseExceptionGroup
                if not isinstance(exc, (Exception, BaseExceptionGroup)):
                    raise
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def _call_and_validate(case: schemathesis.Case, stack: Any) -> Any:
    headers = {"Authorization": f"Bearer {stack.key}"}
    response = case.call(base_url=stack.url, headers=headers, timeout=60)
    case.validate_response(response, checks=CHECKS, headers=headers)
    return response


def test_real_jobs_and_their_webhooks_match_the_document(api_schema: schemathesis.BaseSchema, contract_stack: Any,
                                                         receiver: WebhookReceiver) -> None:
    """Every kind of job result (CAM, I-GOS, SAG, plug-ins; pictures inline and behind links),
    a failure, a cancellation, the files, the PNG answer of /v1/explain and the webhook bodies,
    checked against the served document with the same checks."""

    def check(path: str, verb: str, **parts: Any) -> Any:
        return _call_and_validate(api_schema[path][verb].Case(**parts), contract_stack)

    ids = {}
    for method in ("gradcam", "igos", "sag", "no_picture", "boom", "slow"):
        params = {**JOB_PARAMS.get(method, {}), **({"steps": 200, "step_s": 0.05} if method == "slow" else {})}
        answer = check("/v1/jobs", "POST", media_type="multipart/form-data", body={
            "image": png((48, 40)), "method": method, "model": "tiny", "callback_url": receiver.url,
            "params": json.dumps(params)})
        assert answer.status_code == 202, answer.text
        ids[method] = answer.json()["id"]
    assert check("/v1/jobs/{job_id}", "DELETE", path_parameters={"job_id": ids["slow"]}).status_code in (200, 202)
    deadline, ended = time.monotonic() + 120, {}
    while len(ended) < len(ids) and time.monotonic() < deadline:
        for method, job_id in ids.items():
            for pictures in ("links", "inline"):
                view = check("/v1/jobs/{job_id}", "GET", path_parameters={"job_id": job_id},
                             query={"pictures": pictures}).json()
            if view["status"] in TERMINAL:
                ended[method] = view["status"]
        time.sleep(0.2)
    assert ended == {"gradcam": "succeeded", "igos": "succeeded", "sag": "succeeded", "no_picture": "succeeded",
                     "boom": "failed", "slow": "canceled"}
    for method in ("gradcam", "sag"):
        files = check("/v1/jobs/{job_id}", "GET", path_parameters={"job_id": ids[method]}).json()["result"]["files"]
        assert {"image/png", "image/svg+xml"} >= {entry["media_type"] for entry in files.values()}
        for name in files:  # pictures behind links
            check("/v1/jobs/{job_id}/files/{name}", "GET", path_parameters={"job_id": ids[method], "name": name})
    check("/v1/jobs/{job_id}/result.png", "GET", path_parameters={"job_id": ids["gradcam"]})
    assert check("/v1/jobs/{job_id}/result.png", "GET", path_parameters={"job_id": ids["boom"]}).status_code == 409
    check("/v1/jobs", "GET", query={"limit": 2})
    picture = check("/v1/explain", "POST", media_type="multipart/form-data", headers={"Accept": "image/png"},
                    body={"image": png(), "model": "tiny"})
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    study = check("/v1/studies", "POST", media_type="multipart/form-data",
                  body={"archive": study_zip(), "spec": json.dumps({**STUDY_SPEC, "name": "contract"})})
    assert study.status_code == 202, study.text
    deadline = time.monotonic() + 60
    while check("/v1/studies/{study_id}", "GET", path_parameters={"study_id": study.json()["id"]}).json()[
            "status"] != "succeeded":
        assert time.monotonic() < deadline, "the study did not finish"
        time.sleep(0.2)
    for path in ("/v1/studies/{study_id}/items.csv", "/v1/studies/{study_id}"):
        check(path, "GET", path_parameters={"study_id": study.json()["id"]})
    check("/v1/studies/{study_id}/items/{index}/overlay.png", "GET",
          path_parameters={"study_id": study.json()["id"], "index": 0})

    document = api_schema.raw_schema
    event = {**document["components"]["schemas"]["JobEvent"], "components": document["components"]}
    deadline = time.monotonic() + 30
    while len({body["data"]["id"] for _, body in receiver.accepted()} & set(ids.values())) < len(ids):
        assert time.monotonic() < deadline, "not every job's webhook arrived"
        time.sleep(0.1)
    for headers, body in receiver.accepted():
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
        jsonschema_rs.Draft202012Validator(event, validate_formats=True).validate(body)
