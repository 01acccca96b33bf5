"""ONNX Runtime scoring on a CPU (``explainers.execution.onnx_cpu``), checked against PyTorch.

The real efficientnet_lite0 (its folded copy, as SAG scores it) is exported and compared with
PyTorch's own forwards on real photos at other batch sizes and image sizes than the export's;
SAG's scorer in ONNX Runtime must give the scores its PyTorch scorer gives, incremental crops
included, and Score-CAM, the metrics and I-GOS's line search must give PyTorch's results;
networks that cannot be exported, or whose export computes something else, must be refused so
that PyTorch scores them; the start-up warm-up must export before any job.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from explainers.errors import ExplainError
from explainers.execution import Execution, ExecutionPolicy, PatchScorer, onnx_cpu
from explainers.sag import SAG, SAGConfig, make_baseline
from tests.test_incremental import one_patch_walk


def test_onnx_runtime_is_installed():
    # a dependency of the service: without it SAG silently runs at PyTorch's speed
    assert onnx_cpu.available()
    assert onnx_cpu.wanted("auto", torch.device("cpu")) and not onnx_cpu.wanted("torch", torch.device("cpu"))
    assert not onnx_cpu.wanted("auto", torch.device("cuda"))
    network = torch.nn.Linear(2, 2)
    assert Execution(network).onnx_wanted() and not Execution(network, ExecutionPolicy(cpu_runtime="torch")).onnx_wanted()


def test_default_model_in_onnx_runtime_computes_pytorchs_logits(default_model, chelsea, coffee):
    cat, _ = default_model.preprocessor.to_input(chelsea)
    cup, _ = default_model.preprocessor.to_input(coffee)
    network = default_model.execution.folded_network(cat)
    forward = onnx_cpu.build(network, cat)
    assert isinstance(forward, onnx_cpu.OnnxForward)
    batch = torch.cat([cat, cup, cat.flip(-1) * 0.5])  # 3 images, exported with 1
    smaller = F.interpolate(batch, size=(160, 192), mode="bilinear", align_corners=False)  # another size
    for images in (batch, smaller, batch.contiguous(memory_format=torch.channels_last)):
        with torch.inference_mode():
            expected = network(images)
            got = forward(images)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
        assert torch.equal(got.argmax(1), expected.argmax(1))


class MatrixExponential(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(x[:, 0, :4, :4]).flatten(1)  # no ONNX operator for it


class TracedConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # the export freezes the count it saw: not what this network computes next
        return x.flatten(1) + float(self.calls)


@pytest.mark.parametrize("module,why", [(MatrixExponential(), "no ONNX Runtime copy"), (TracedConstant(), "differs by")])
def test_networks_onnx_runtime_cannot_reproduce_are_refused(module, why, caplog):
    assert onnx_cpu.build(module, torch.randn(1, 3, 8, 8)) is None
    assert why in caplog.text


def test_sag_scorer_in_onnx_runtime_scores_like_pytorch(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    execution = default_model.execution
    network = execution.folded_network(inputs)
    base = make_baseline("black", inputs, torch.tensor(default_model.spec.mean), torch.tensor(default_model.spec.std))
    scorers = [PatchScorer(network, inputs, base, 285, 7, 8) for _ in range(2)]
    for scorer in scorers:
        scorer.use_incremental()
    onnx, plain = scorers
    onnx.use_onnx_runtime(lambda name, module, example: execution.exported(network, name, module, example))
    assert onnx.runtime == "onnxruntime" and plain.runtime == "torch"
    assert isinstance(onnx.incremental.split.suffix, onnx_cpu.OnnxForward)
    assert isinstance(onnx.incremental.split.prefix, onnx_cpu.OnnxForward)
    for keys in one_patch_walk(7, 6, seed=3):
        fast, slow = onnx.score(keys), plain.score(keys)
        assert [fast[k] for k in keys] == pytest.approx([slow[k] for k in keys], rel=1e-4, abs=1e-7)
    assert onnx.verified is True and onnx.incremental_images > 0  # crops through the exported prefix


def test_sag_states_its_runtime_and_torch_can_be_chosen(default_model, chelsea):
    from core.settings import SettingsError, load_core_settings

    inputs, _ = default_model.preprocessor.to_input(chelsea)
    config = SAGConfig(grid=3, beam_width=1, successors=3, max_root_size=4, max_roots=1, max_nodes=4,
                       ordering="occlusion")
    runs = {}
    for runtime in ("torch", "onnxruntime"):
        sag = SAG(default_model.execution.with_policy(cpu_runtime=runtime), config,
                  normalization=default_model.normalization)
        runs[runtime] = sag.explain(inputs)
        assert runs[runtime].details["runtime"] == runtime
    assert [r.patches for r in runs["torch"].roots] == [r.patches for r in runs["onnxruntime"].roots]
    assert [n.score for n in runs["onnxruntime"].nodes] == pytest.approx(
        [n.score for n in runs["torch"].nodes], rel=1e-4, abs=1e-7)
    with pytest.raises(ExplainError):  # the runtime is the execution's, not a SAG parameter
        SAGConfig(cpu_runtime="onnxruntime")  # type: ignore[call-arg]
    with pytest.raises(SettingsError, match="UNBOX_CPU_RUNTIME"):

        load_core_settings(cpu_runtime="tensorrt")


def test_sag_jobs_take_the_runtime_from_the_environment(monkeypatch):
    from core.settings import SettingsError, load_core_settings

    assert load_core_settings().execution_policy().cpu_runtime == "auto"
    monkeypatch.setenv("UNBOX_CPU_RUNTIME", "torch")
    assert load_core_settings().execution_policy().cpu_runtime == "torch"
    monkeypatch.setenv("UNBOX_CPU_RUNTIME", "fast")
    with pytest.raises(SettingsError, match="UNBOX_CPU_RUNTIME"):
        load_core_settings()


def test_scorecam_and_metrics_in_onnx_runtime_match_pytorch(default_model, coffee):
    from explainers.cam import ScoreCAM, ScoreCAMConfig
    from explainers.metrics import deletion_insertion

    inputs, _ = default_model.preprocessor.to_input(coffee)
    layer = default_model.default_layer
    maps, metrics = {}, {}
    for runtime in ("torch", "onnxruntime"):
        execution = default_model.execution.with_policy(cpu_runtime=runtime)
        cam = ScoreCAM(execution, ScoreCAMConfig(channels=24), layer=layer)
        explanation = cam.explain(inputs)
        assert explanation.details["runtime"] == runtime
        maps[runtime] = explanation.saliency
        metrics[runtime] = deletion_insertion(execution, inputs, explanation.saliency, explanation.targets, steps=8)
    assert float((maps["torch"] - maps["onnxruntime"]).abs().max()) < 1e-3
    for curve in ("deletion_curve", "insertion_curve"):
        assert getattr(metrics["onnxruntime"], curve).flatten().tolist() == pytest.approx(
            getattr(metrics["torch"], curve).flatten().tolist(), rel=1e-4, abs=1e-6)


def test_igos_line_search_in_onnx_runtime_gives_pytorchs_mask(default_model, chelsea):
    from explainers.igos import IGOSPlusPlus, IGOSPlusPlusConfig

    inputs, _ = default_model.preprocessor.to_input(chelsea)
    results = {}
    for runtime in ("torch", "onnxruntime"):
        config = IGOSPlusPlusConfig(mask_size=7, iterations=3, steps=4)
        results[runtime] = IGOSPlusPlus(default_model.execution.with_policy(cpu_runtime=runtime), config).explain(inputs)
        assert results[runtime].details["forward_runtime"] == runtime
        assert results[runtime].details["images_evaluated"]["forward"] > 0  # line-search trials ran
    # the trials only choose step sizes; same choices, same mask (the gradients are PyTorch's in both)
    torch_mask, onnx_mask = (results[r].details["mask"] for r in ("torch", "onnxruntime"))
    assert float((torch_mask - onnx_mask).abs().max()) < 1e-4


def test_worker_warm_up_exports_the_scoring_networks_before_any_job(default_model, caplog):
    from core.settings import load_core_settings

    size = default_model.spec.input_size
    grid = SAGConfig().grid  # the lattice workers warm the patch scorer for
    execution = Execution(default_model.module, load_core_settings().execution_policy())  # as in a fresh worker
    assert not execution._variants.exports
    with caplog.at_level("INFO", logger="unbox.execution"):
        execution.warm(size, default_model.default_layer, grid)
    network = execution.folded_network(torch.zeros(1, 3, size, size))
    built = {name: forward for (owner, name), forward in execution._variants.exports.items() if owner == id(network)}
    assert {key.split("-")[0] for key in built} == {"whole", "prefix", "suffix"}
    assert all(isinstance(forward, onnx_cpu.OnnxForward) for forward in built.values())
    assert "patch sets score with onnxruntime" in caplog.text and "scores run in onnxruntime" in caplog.text
    torch_execution = Execution(default_model.module, load_core_settings(cpu_runtime="torch").execution_policy())
    torch_execution.warm(size, default_model.default_layer, grid)
    assert not torch_execution._variants.exports  # nothing exported when PyTorch is asked for

