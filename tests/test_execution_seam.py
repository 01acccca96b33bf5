"""The execution seam and the one method contract (issue 19): structure and behaviour.

Structure is read off the source (imports, module-level state); behaviour runs the real model:
one execution per loaded model that owns every variant, sessions that record what ran, one
registry from which job schemas are derived with the methods' own defaults and bounds.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from explainers.errors import ExplainError
from explainers.execution import Execution, ExecutionPolicy
from explainers.method import Method, MethodConfig
from explainers.registry import METHODS, SYNCHRONOUS, create

EXPLAINERS = Path(__file__).resolve().parents[1] / "explainers"
METHOD_FILES = ("cam.py", "gradient_cams.py", "igos.py", "sag.py", "metrics.py", "rollout.py")
SPEED_MODULES = ("fastpath", "lean", "lean_layers", "onnx_cpu", "incremental", "batching", "cuda", "patch_scorer",
                 "policy")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("name", METHOD_FILES)
def test_method_files_import_no_speed_module(name):
    imported = _imports(EXPLAINERS / name)
    speed = {module for module in imported for part in SPEED_MODULES
             if module.startswith((f"explainers.{part}", f"explainers.execution.{part}"))}
    assert not speed, f"{name} imports {sorted(speed)}"
    assert not any(module.startswith("torch.cuda") or module == "onnxruntime" for module in imported)


def _module_level_caches(path: Path) -> list[str]:
    """Module-level assignments of empty containers or weak dictionaries, and memo decorators."""
    found = []
    tree = ast.parse(path.read_text())
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, (ast.Dict, ast.Set, ast.List)) and not getattr(value, "keys", getattr(value, "elts", [1])):
            found.append(f"{path.name}:{node.lineno}")
        if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in (
                "dict", "set", "list", "WeakKeyDictionary", "WeakValueDictionary", "OrderedDict", "defaultdict"):
            found.append(f"{path.name}:{node.lineno}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if ast.unparse(decorator).split(".")[-1].split("(")[0] in ("cache", "lru_cache"):
                    found.append(f"{path.name}:{node.lineno} @{ast.unparse(decorator)}")
    return found


def test_no_module_level_cache_remains_in_explainers():
    found = [hit for path in sorted(EXPLAINERS.rglob("*.py")) for hit in _module_level_caches(path)]
    assert not found, found


def test_the_cache_detector_sees_a_cache(tmp_path):
    """The detector itself: the shapes the old module caches had are found."""
    sample = tmp_path / "sample.py"
    sample.write_text("import weakref, functools\n_copies = weakref.WeakKeyDictionary()\n_failed: set = set()\n"
                      "_runners = {}\n@functools.cache\ndef f():\n    return 1\nKNOWN = {'a': 1}\n")
    assert len(_module_level_caches(sample)) == 4


# -- one contract, one registry ------------------------------------------------------------------

def test_every_method_has_one_contract():
    for name, method in METHODS.items():
        assert issubclass(method, Method) and method.name == name
        assert issubclass(method.Config, MethodConfig)
        parameters = list(inspect.signature(method.explain).parameters)
        assert parameters[:4] == ["self", "inputs", "targets", "progress"], (name, parameters)
    assert set(SYNCHRONOUS) == {"cam", "gradcam", "scorecam", "rollout", "gradcam++", "xgradcam", "layercam",
                                "hirescam", "eigencam"}


def test_job_parameters_are_the_method_configs():
    """Job schemas are derived from the configs: the same fields, defaults and bounds."""
    from workers.methods import load_builtin_methods

    jobs = load_builtin_methods()
    for name, method in METHODS.items():
        schema = jobs[name].params.model_json_schema()["properties"]
        own = method.Config.model_json_schema()["properties"]
        for field, spec in own.items():
            for key in ("default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum"):
                assert schema[field].get(key) == spec.get(key), (name, field, key)
    assert jobs["igos++"].params.model_fields["iterations"].default == 20
    assert jobs["igos"].params.model_fields["iterations"].default == 15


def test_a_bad_parameter_is_invalid_parameter_everywhere():
    from core.validation import describe_validation_errors
    from explainers.sag import SAGConfig
    from workers.methods import load_builtin_methods

    with pytest.raises(ExplainError) as caught:
        SAGConfig(grid=1)
    assert caught.value.code == "invalid_parameter" and "grid" in caught.value.message
    with pytest.raises(ValidationError) as refused:
        load_builtin_methods()["sag"].params.model_validate({"grid": 1, "top_k": 0})
    message = describe_validation_errors(refused.value.errors(), "params")
    assert "grid" in message and "top_k" in message and "Value error" not in message


# -- the execution object --------------------------------------------------------------------------

def test_the_loaded_model_owns_one_execution_whose_variants_are_built_once(default_model):
    execution = default_model.execution
    assert execution.model is default_model.module
    size = default_model.spec.input_size
    example = torch.zeros(1, 3, size, size)
    folded = execution.folded_network(example)
    assert folded is not default_model.module  # batch norm folded, verified: a copy
    view = execution.with_policy(precision="bf16", cpu_runtime="torch")
    assert view.folded_network(example) is folded  # views share the model's variants
    assert execution.same_arithmetic_network(example) is view.same_arithmetic_network(example)


def test_sessions_record_what_ran_and_policies_choose_it(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    execution = default_model.execution
    onnx = execution.session()
    exact = execution.with_policy(cpu_runtime="torch").session()
    first = onnx.logits(inputs, exact=True)
    second = exact.logits(inputs, exact=True)
    assert onnx.ran("scores") == {"precision": "fp32", "runtime": "onnxruntime"}
    assert exact.ran("scores") == {"precision": "fp32", "runtime": "torch"}
    assert torch.allclose(first, second, rtol=1e-4, atol=1e-4 * float(second.abs().max()))
    assert first.argmax() == default_model.logits(inputs).argmax()
    reduced = execution.with_policy(precision="bf16").session()
    reduced.logits(inputs)
    assert reduced.ran("scores")["precision"] == "bf16"  # ONNX Runtime cannot honour reduced precision
    assert reduced.ran("scores")["runtime"] == "torch"


def test_rounding_sensitive_view_keeps_the_models_arithmetic_on_a_cpu(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    view = default_model.execution.rounding_sensitive()
    assert view.policy.network == "as_loaded"
    network, nhwc = view._path_network(inputs)
    assert network is default_model.execution.same_arithmetic_network(inputs) and not nhwc
    with torch.no_grad():
        assert torch.equal(network(inputs), default_model.module(inputs))  # bit-identical logits


def test_float16_gradient_scale_is_exact():
    """The loss scale of fp16 backward passes is a power of two: scaling commutes exactly."""
    from explainers.execution.execution import FLOAT16_GRADIENT_SCALE, _GradientScale

    assert FLOAT16_GRADIENT_SCALE == 2.0 ** round(torch.log2(torch.tensor(FLOAT16_GRADIENT_SCALE)).item())
    x = torch.randn(64, dtype=torch.float32, requires_grad=True)
    (plain,) = torch.autograd.grad((x.sin() * 3).sum(), x)
    scaled = _GradientScale.apply(_GradientScale.apply(x, 1 / FLOAT16_GRADIENT_SCALE).sin() * 3,
                                  FLOAT16_GRADIENT_SCALE)
    (through,) = torch.autograd.grad(scaled.sum(), x)
    assert torch.equal(plain, through)
    (four,) = torch.autograd.grad(_GradientScale.apply(x, 4.0).sum(), x)
    assert torch.equal(four, torch.full_like(x, 4.0))  # the scale reaches the gradient


def test_policy_has_one_precision_vocabulary():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = ExecutionPolicy()
    assert auto.dtype(cpu, "scores") is None and auto.dtype(cpu, "path_gradients") is None
    assert auto.dtype(cuda, "scores") == torch.float16 and auto.dtype(cuda, "layer_gradients") == torch.float16
    assert ExecutionPolicy(precision="bf16").dtype(cpu, "path_gradients") == torch.bfloat16
    assert ExecutionPolicy(precision="fp32").dtype(cuda, "scores") is None
    for bad in ({"images_per_forward": 0}, {"precision": "fp8"}, {"network": "lean"}, {"cpu_runtime": "tensorrt"}):
        with pytest.raises(ValueError):
            ExecutionPolicy(**bad)


def test_create_binds_a_registered_method(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    method = create("gradcam", default_model.execution, layer=default_model.default_layer)
    seen = []
    explanation = method.explain(inputs, None, lambda fraction, stage: seen.append((fraction, stage)))
    assert explanation.method == "gradcam" and seen[-1][0] == 1.0
    with pytest.raises(ExplainError) as caught:
        create("gradcam", default_model.execution)  # no layer
    assert caught.value.code == "layer_unsupported"
    with pytest.raises(ExplainError) as caught:
        create("igos", Execution(default_model.module), synchronous=True)
    assert caught.value.code == "unknown_method"


def test_logits_are_chunked_without_losing_images(default_model):
    """Forward-only logits in chunks of the policy's size: every image, each as if scored alone."""
    images = torch.randn(11, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    execution = default_model.execution.with_policy(images_per_forward=4, cpu_runtime="torch")
    chunked = execution.session().logits(images, exact=True)
    alone = torch.cat([execution.session().logits(images[i:i + 1], exact=True) for i in range(11)])
    assert chunked.shape == (11, default_model.num_classes)
    assert torch.allclose(chunked, alone, rtol=1e-4, atol=1e-4 * float(alone.abs().max()))


def test_a_failing_warm_up_never_fails_the_load(caplog):
    """A model whose layer cannot be captured (or any other warm-up failure) still loads."""

    class NoFeatureMap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.mean(dim=(2, 3)))

    execution = Execution(NoFeatureMap(), ExecutionPolicy(cpu_runtime="torch"))
    execution.warm(8, layer="head", patch_grid=2)  # the patch scorer's set-up runs; nothing raises
    broken = Execution(NoFeatureMap(), ExecutionPolicy(cpu_runtime="torch"))
    broken._warm = lambda *args: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="unbox.execution"):
        broken.warm(8)
    assert "warm-up of NoFeatureMap failed" in caplog.text and "boom" in caplog.text
