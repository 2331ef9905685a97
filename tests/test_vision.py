"""The vision encoder and projector against transformers' LLaVA, their serving artifacts, ONNX and batching."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from export import tensorrt as trt_export
from export.onnx_export import ONNX_REL_TOLERANCE, OnnxMismatchError, check_error, export_vision
from export.vision_weights import load_from_checkpoint
from llava_triton import batching, vision, vision_serving
from llava_triton.dtypes import resolve_dtype
from llava_triton.errors import InvalidRequestError
from llava_triton.spec import (
    IMAGE_EMBEDS,
    IMAGE_FEATURES,
    PIXEL_VALUES,
    PROJECTOR,
    SPEC_FILE,
    VISION_ENCODER,
    ModelSpec,
    ServingConfig,
    write_spec,
)
from llava_triton.torch_compile import compile_or_eager, maybe_compiled
from llava_triton.vision_artifacts import (
    MODULE_CONFIG_FILE,
    WEIGHTS_FILE,
    load_encoder,
    load_projector,
    save_for_serving,
)

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 patches
SERVING = ServingConfig(vision_max_batch_size=4, vision_preferred_batch_sizes=(2, 4))


def _tiny_llava(vision_feature_layer: int = -2, strategy: str = "default") -> LlavaForConditionalGeneration:
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=16)
    text_config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=100,
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[LlavaForConditionalGeneration, Path]:
    model = _tiny_llava()
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    return model, path


def _variant(checkpoint_dir: Path, target: Path, **config_changes) -> Path:
    """The same weights with other config.json values."""
    target.mkdir()
    for item in checkpoint_dir.iterdir():
        (target / item.name).symlink_to(item)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    (target / "config.json").unlink()
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


def _pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _reference(model, pixel_values, layer, strategy) -> torch.Tensor:
    with torch.inference_mode():
        output = model.model.get_image_features(pixel_values, vision_feature_layer=layer,
                                                vision_feature_select_strategy=strategy)
    return torch.stack(list(output.pooler_output))  # (B, num_image_tokens, text_hidden_size)


@pytest.mark.parametrize("layer", [-2, -1])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_matches_transformers_get_image_features(checkpoint, tmp_path, layer, strategy):
    model, path = checkpoint
    variant = _variant(path, tmp_path / "variant", vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    encoder, projector = load_from_checkpoint(variant)
    pixel_values = _pixels(3)
    with torch.inference_mode():
        features = encoder(pixel_values)
        embeds = projector(features)
    spec = ModelSpec.from_pretrained(variant)
    assert features.shape == (3, spec.num_image_tokens, spec.vision_hidden_size)
    assert encoder.num_image_tokens == spec.num_image_tokens == (17 if strategy == "full" else 16)
    torch.testing.assert_close(embeds, _reference(model, pixel_values, layer, strategy), rtol=0, atol=1e-6)
    # Only the layers up to the selected one are built: -2 skips the last of the 3.
    assert len(encoder.vision_tower.encoder.layers) == (2 if layer == -2 else 3)


def _rewrite_keys(source: Path, target: Path, rename, shards: int = 1) -> Path:
    """Copy a checkpoint with its tensor names renamed, optionally split into shards with an index."""
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    tensors = {rename(name): tensor for name, tensor in load_file(source / "model.safetensors").items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, target / "model.safetensors")
        return target
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = names[shard::shards]
        save_file({name: tensors[name] for name in part}, target / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return target


def _llava_hf_layout(name: str) -> str:  # the older layout of llava-hf checkpoints
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1) if name.startswith("vision_tower.") else name


def _model_prefixed_layout(name: str) -> str:  # transformers 5's in-memory names
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + _llava_hf_layout(name)
    return name


@pytest.mark.parametrize("rename,shards", [(_llava_hf_layout, 1), (_model_prefixed_layout, 3)])
def test_loads_other_key_layouts(checkpoint, tmp_path, rename, shards):
    model, path = checkpoint
    other = _rewrite_keys(path, tmp_path / "other", rename, shards)
    encoder, projector = load_from_checkpoint(other)
    pixel_values = _pixels(2)
    with torch.inference_mode():
        embeds = projector(encoder(pixel_values))
    torch.testing.assert_close(embeds, _reference(model, pixel_values, -2, "default"), rtol=0, atol=1e-6)


def test_checkpoint_errors(checkpoint, tmp_path):
    _, path = checkpoint
    no_projector = _rewrite_keys(path, tmp_path / "no-projector", lambda name: name.replace("multi_modal", "other"))
    with pytest.raises(ValueError, match="lacks 4 needed tensors"):
        load_from_checkpoint(no_projector)
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    shutil.copy(path / "config.json", doubled)
    tensors = load_file(path / "model.safetensors")
    save_file(tensors, doubled / "a.safetensors")
    save_file({_llava_hf_layout(name): tensor for name, tensor in tensors.items() if "vision_tower" in name},
              doubled / "b.safetensors")
    with pytest.raises(ValueError, match="map to"):
        load_from_checkpoint(doubled)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled)
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_from_checkpoint(pickled)
    with pytest.raises(ValueError, match="out of range"):
        vision.num_layers_needed(-5, 3)
    with pytest.raises(ValueError, match="single integer"):
        vision.num_layers_needed([-2, -1], 3)
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("float64")


def test_save_for_serving_round_trip(checkpoint, tmp_path):
    _, path = checkpoint
    encoder, projector = load_from_checkpoint(path)
    written = save_for_serving(encoder, projector, tmp_path / "enc", tmp_path / "proj")
    assert sorted(p.name for p in written) == sorted([WEIGHTS_FILE, MODULE_CONFIG_FILE] * 2)
    pixel_values = _pixels(2)
    loaded_encoder, loaded_projector = load_encoder(tmp_path / "enc"), load_projector(tmp_path / "proj")
    with torch.inference_mode():
        expected = projector(encoder(pixel_values))
        torch.testing.assert_close(loaded_projector(loaded_encoder(pixel_values)), expected, rtol=0, atol=0)
        half_encoder = load_encoder(tmp_path / "enc", dtype="bfloat16")
        half_projector = load_projector(tmp_path / "proj", dtype=torch.bfloat16)
        assert next(half_encoder.parameters()).dtype == torch.bfloat16
        torch.testing.assert_close(half_projector(half_encoder(pixel_values)).float(), expected, rtol=0.05, atol=0.05)


def test_compiled_modules_match_eager_for_every_batch_with_few_compilations(checkpoint, tmp_path):
    """torch.compile (inductor, here on the CPU; on a GPU `torch_compile` turns it on): one compiled
    encoder layer serves every layer and, with the dynamic batch, every batch size."""
    from torch._dynamo.utils import counters

    _, path = checkpoint
    save_for_serving(*load_from_checkpoint(path), tmp_path / "enc", tmp_path / "proj")
    eager = (load_encoder(tmp_path / "enc"), load_projector(tmp_path / "proj"))
    compiled = (load_encoder(tmp_path / "enc"), load_projector(tmp_path / "proj"))
    counters.clear()
    for module in compiled:
        module.compile_layers()
    with torch.inference_mode():
        for batch in (1, 2, 3, 5):
            pixels = _pixels(batch, seed=batch)
            features = compiled[0](pixels)
            torch.testing.assert_close(features, eager[0](pixels), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(compiled[1](features), eager[1](features), rtol=1e-4, atol=1e-5)
    # Batch 1 is specialised, every other batch shares the dynamic version: two graphs per module.
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    for module in compiled:
        module.uncompile_layers()
    assert compiled[0].encoder_layer is vision.encoder_layer and "forward" not in compiled[1].__dict__


def test_maybe_compiled_is_eager_on_the_cpu_when_off_or_when_compilation_fails(checkpoint, monkeypatch, caplog):
    _, path = checkpoint
    encoder, projector = load_from_checkpoint(path)
    cpu = torch.device("cpu")
    maybe_compiled(encoder, (3, IMAGE_SIZE, IMAGE_SIZE), torch.float32, cpu, True)  # CPU: never compiled
    maybe_compiled(projector, (16, 32), torch.float32, torch.device("cuda"), False)  # off
    assert encoder.encoder_layer is vision.encoder_layer and "forward" not in projector.__dict__

    def broken_compile(function, **options):  # what a machine without a C compiler gives
        def run(*args):
            raise RuntimeError("no C compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    # What maybe_compiled (and the language model's compile_model) do on a GPU: the warm-up call
    # fails, and the module goes back to its eager layers.
    assert not compile_or_eager(projector, "Projector", lambda: projector(torch.zeros(1, 16, 32)))
    assert "forward" not in projector.__dict__
    assert "torch.compile of Projector failed; running it eagerly" in caplog.text
    with torch.inference_mode():
        assert projector(torch.zeros(2, 16, 32)).shape == (2, 16, 48)


def test_concat_and_split():
    batches = [np.full((n, 2, 3), n, np.float32) for n in (2, 1, 3)]
    stacked, sizes = batching.concat_batches(batches)
    assert stacked.shape == (6, 2, 3) and sizes == [2, 1, 3]
    for part, batch in zip(batching.split_batch(stacked, sizes), batches):
        np.testing.assert_array_equal(part, batch)
        assert part.flags.c_contiguous
    with pytest.raises(ValueError, match="do not add up"):
        batching.split_batch(stacked, [2, 2])
    with pytest.raises(ValueError, match="no batches"):
        batching.concat_batches([])


def test_copy_rows_takes_any_span_of_the_stacked_batches():
    batches = [np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * n for n in (2, 1, 3, 0, 4)]
    stacked, _ = batching.concat_batches(batches)
    for start in range(len(stacked) + 1):
        for end in range(start, len(stacked) + 1):
            out = np.full((end - start, 2), -1, np.float32)
            batching.copy_rows(batches, start, end, out)
            np.testing.assert_array_equal(out, stacked[start:end])
    with pytest.raises(ValueError, match="rows 3..11 do not fit"):
        batching.copy_rows(batches, 3, 11, np.zeros((8, 2), np.float32))
    with pytest.raises(ValueError, match="rows 3..5 do not fit the batches or the 3 rows of out"):
        batching.copy_rows(batches, 3, 5, np.zeros((3, 2), np.float32))


def test_select_device():
    assert vision_serving.select_device("CPU", "0") == torch.device("cpu")
    if torch.cuda.is_available():
        assert vision_serving.select_device("GPU", "1") == torch.device("cuda:1")
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            vision_serving.select_device("GPU", "0")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """One PyTorch-engine export of the tiny checkpoint, with the spec file the lead's exporter writes."""
    _, path = checkpoint
    repo, work = tmp_path_factory.mktemp("repo"), tmp_path_factory.mktemp("work")
    spec = ModelSpec.from_pretrained(path)
    report = export_vision(path, repo, work, spec, SERVING, "pytorch")
    for name in (VISION_ENCODER, PROJECTOR):
        write_spec(repo / name / "1", spec, SERVING)
    return report, repo, work, spec


def test_export_vision_pytorch_artifacts(exported):
    report, repo, work, _ = exported
    assert report["engine"] == "pytorch"
    for name in (VISION_ENCODER, PROJECTOR):
        files = {p.name for p in (repo / name / "1").iterdir()}
        assert {WEIGHTS_FILE, MODULE_CONFIG_FILE, SPEC_FILE} <= files
        assert not (repo / name / "config.pbtxt").exists()  # the lead's generator writes every config
        assert [p.name for p in report["artifacts"][name]] == [WEIGHTS_FILE, MODULE_CONFIG_FILE]
    assert (work / f"{VISION_ENCODER}.onnx").exists() and (work / f"{PROJECTOR}.onnx").exists()


def test_onnx_matches_pytorch(exported):
    report, _, _, spec = exported
    for name, input_name, output_name, item_shape in (
            (VISION_ENCODER, PIXEL_VALUES, IMAGE_FEATURES, vision.pixel_values_shape(spec)),
            (PROJECTOR, IMAGE_FEATURES, IMAGE_EMBEDS, vision.image_features_shape(spec))):
        result = report["onnx"][name]
        print(f"{name}: ONNX max abs error {result['max_abs_error']:.3g} (bound {result['bound']:.3g})")
        assert result["max_abs_error"] <= result["bound"] and result["batch_sizes"][0] == 1
        assert max(result["batch_sizes"]) > 1
        graph = onnx.load(result["onnx"]).graph
        assert [i.name for i in graph.input] == [input_name] and [o.name for o in graph.output] == [output_name]
        dims = graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(item_shape)  # dynamic batch only


def test_check_error_bound():
    assert check_error("x", 1e-7, 3.0) == pytest.approx(3 * ONNX_REL_TOLERANCE)
    with pytest.raises(OnnxMismatchError, match="differs from PyTorch"):
        check_error("x", 0.1, 3.0)
    with pytest.raises(OnnxMismatchError):
        check_error("x", float("nan"), 3.0)


def test_served_modules_batch_requests(exported, checkpoint):
    model, _ = checkpoint
    _, repo, _, spec = exported
    encoder = vision_serving.serve_encoder(repo / VISION_ENCODER / "1", "CPU", "0")
    projector = vision_serving.serve_projector(repo / PROJECTOR / "1", "CPU", "0")
    first, second = _pixels(2, seed=3).numpy(), _pixels(1, seed=4).numpy()
    nan = first.copy()
    nan[0, 0, 0, 0] = np.nan
    results = encoder.run_requests([first, first[:, :2], None, second, first.astype(np.float64), nan])
    for index, message in ((1, "must have shape"), (2, "missing input"), (4, "must be FP32"), (5, "NaN")):
        assert isinstance(results[index], InvalidRequestError) and message in str(results[index])
    assert results[0].shape == (2, spec.num_image_tokens, spec.vision_hidden_size)
    assert results[3].shape == (1, spec.num_image_tokens, spec.vision_hidden_size)
    assert results[0].dtype == np.float32
    embeds = projector.run_requests([results[0], results[3]])
    for pixels, result in ((first, embeds[0]), (second, embeds[1])):
        expected = _reference(model, torch.from_numpy(pixels), -2, "default").numpy()
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
    assert encoder.forward([first[:0]])[0].shape == (0, spec.num_image_tokens, spec.vision_hidden_size)


@pytest.fixture(scope="module")
def served_bfloat16(exported, tmp_path_factory):
    """The exported encoder and projector served as a bfloat16 deployment: FP16 on the wire."""
    _, repo, _, spec = exported
    serving = dataclasses.replace(SERVING, dtype="bfloat16")
    modules = []
    for name, serve in ((VISION_ENCODER, vision_serving.serve_encoder), (PROJECTOR, vision_serving.serve_projector)):
        version_dir = tmp_path_factory.mktemp(name) / "1"
        shutil.copytree(repo / name / "1", version_dir)
        write_spec(version_dir, spec, serving)
        modules.append(serve(version_dir, "CPU", "0"))
    return modules


def test_served_modules_batch_requests_with_an_fp16_wire(served_bfloat16, exported, checkpoint):
    model, _ = checkpoint
    spec = exported[3]
    encoder, projector = served_bfloat16
    assert (encoder.dtype, encoder.wire_dtype, projector.wire_dtype) == (torch.bfloat16, np.float16, np.float16)
    first, second = _pixels(2, seed=3).numpy().astype(np.float16), _pixels(1, seed=4).numpy().astype(np.float16)
    nan, inf = second.copy(), first.copy()
    nan[0, 1, 2, 3] = np.nan
    inf[1, 0, 0, 0] = np.inf  # the second image of a request: the whole request is refused
    # The non-finite requests sit between good ones in one forward, which refuses exactly them.
    results = encoder.run_requests([first, nan, None, second, first.astype(np.float32), inf, first[:, :, :8]])
    for index, message in ((1, "pixel_values contains NaN or infinite values"), (2, "missing input"),
                           (4, "pixel_values must be FP16, got float32"), (5, "pixel_values contains NaN"),
                           (6, "must have shape")):
        assert isinstance(results[index], InvalidRequestError) and message in str(results[index]), index
    features = [results[0], results[3]]
    assert [f.shape for f in features] == [(2, spec.num_image_tokens, spec.vision_hidden_size),
                                           (1, spec.num_image_tokens, spec.vision_hidden_size)]
    assert all(f.dtype == np.float16 and np.isfinite(f).all() for f in features)
    # A NaN request in the projector's batch is refused the same way, naming its input.
    bad_features = features[1].copy()
    bad_features[0, 0, 0] = np.nan
    embeds = projector.run_requests([features[0], bad_features, features[1]])
    assert isinstance(embeds[1], InvalidRequestError) and "image_features contains NaN" in str(embeds[1])
    for pixels, result in ((first, embeds[0]), (second, embeds[2])):
        assert result.dtype == np.float16
        expected = _reference(model, torch.from_numpy(pixels.astype(np.float32)), -2, "default").numpy()
        np.testing.assert_allclose(result.astype(np.float32), expected, rtol=0.05, atol=0.05)  # bfloat16 compute
    assert encoder.forward([first[:0]])[0].dtype == np.float16


def test_fused_qkv_encoder_matches_the_unfused_one(checkpoint):
    model, path = checkpoint
    encoder, _ = load_from_checkpoint(path)
    pixels = _pixels(3, seed=5)
    with torch.inference_mode():
        unfused = encoder(pixels)
        encoder.fuse()
        fused = encoder(pixels)
    for layer in encoder.vision_tower.encoder.layers:
        attention = layer.self_attn
        assert attention.qkv_proj.weight.shape == (96, 32) and attention.qkv_proj.bias.shape == (96,)
        assert not hasattr(attention, "q_proj")  # the separate matrices are dropped, not kept beside
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-6)


def test_served_modules_with_fp8_weights(exported, checkpoint, tmp_path):
    """vision_weight_dtype=fp8_e4m3: the encoder's layer projections and the projector's linears held
    in FP8 (on the CPU multiplied dequantised; the GPU path is in test_gpu.py), close to transformers."""
    model, _ = checkpoint
    _, repo, _, spec = exported
    serving = dataclasses.replace(SERVING, dtype="bfloat16", vision_weight_dtype="fp8_e4m3")
    served = []
    for name, serve in ((VISION_ENCODER, vision_serving.serve_encoder), (PROJECTOR, vision_serving.serve_projector)):
        shutil.copytree(repo / name / "1", tmp_path / name)
        write_spec(tmp_path / name, spec, serving)
        served.append(serve(tmp_path / name, "CPU", "0"))
    encoder, projector = served
    fp8_weights = {name for name, tensor in encoder.module.state_dict().items() if tensor.dtype == torch.float8_e4m3fn}
    # qkv, out, fc1 and fc2 in each of the 2 layers built (3, cut at -2); the patch embedding stays.
    assert len(fp8_weights) == 2 * 4 and all(name.endswith("proj.weight") or ".fc" in name for name in fp8_weights)
    assert {t.dtype for t in projector.module.state_dict().values()} == {torch.float8_e4m3fn, torch.float32,
                                                                         torch.bfloat16}  # weights, scales, biases
    pixels = _pixels(2, seed=6).numpy().astype(np.float16)
    embeds = projector.run_requests(encoder.run_requests([pixels]))[0]
    expected = _reference(model, torch.from_numpy(pixels.astype(np.float32)), -2, "default").numpy()
    error = np.linalg.norm(embeds.astype(np.float32) - expected) / np.linalg.norm(expected)
    print(f"FP8 vision weights: relative error {error:.4f} against transformers in float32")
    assert 0 < error < 0.08, error
    with pytest.raises(ValueError, match="vision_weight_dtype must be auto or fp8_e4m3, got 'int8'"):
        ServingConfig(vision_weight_dtype="int8")


def test_fp16_wire_output_beyond_fp16_range_is_refused_by_the_next_step():
    # A bfloat16 value past 65504 becomes inf in FP16; the next model's check refuses it.
    def scale(rows: torch.Tensor) -> torch.Tensor:
        return rows * 1e6

    step = batching.BatchedModule(scale, "x", "y", (2,), (2,), torch.device("cpu"), torch.bfloat16,
                                  np.dtype(np.float16))
    (big, small) = step.run_requests([np.array([[0.5, 1.0]], np.float16), np.array([[1e-5, 0.0]], np.float16)])
    assert np.isinf(big).all() and np.isfinite(small).all()
    (refused,) = dataclasses.replace(step, input_name="y").run_requests([big])
    assert isinstance(refused, InvalidRequestError) and "y contains NaN or infinite values" in str(refused)


def test_serving_refuses_artifacts_that_disagree_with_the_spec(exported, tmp_path):
    _, repo, _, spec = exported
    version_dir = tmp_path / "1"
    shutil.copytree(repo / VISION_ENCODER / "1", version_dir)
    other = ModelSpec.from_dict({**spec.to_dict(), "vision_feature_select_strategy": "full"})
    write_spec(version_dir, other, SERVING)
    with pytest.raises(ValueError, match="re-run the export"):
        vision_serving.serve_encoder(version_dir, "CPU", "0")


# --- the Triton adapters, run against a stand-in for triton_python_backend_utils ---

class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _FakeTritonError(Exception):
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class _FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


def _load_adapter(name: str, monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.TritonError, fake.InferenceResponse = _FakeTensor, _FakeTritonError, _FakeResponse
    fake.get_input_tensor_by_name = lambda request, tensor_name: request.get(tensor_name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    adapter = ROOT / "model_repository" / name / "1" / "model.py"
    module_spec = importlib.util.spec_from_file_location(f"_adapter_{name}", adapter)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.TritonPythonModel()


def test_triton_adapters(exported, monkeypatch):
    _, repo, _, spec = exported
    encoder = _load_adapter(VISION_ENCODER, monkeypatch)
    frozen = []  # gc.freeze() recorded, not done: it would last for the rest of the test session
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(len(gc.get_objects())))
    encoder.initialize({"model_repository": str(repo / VISION_ENCODER), "model_version": "1",
                        "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    assert frozen, "the adapter leaves the objects it loaded to the garbage collector (no gc.freeze())"
    pixels = _pixels(2, seed=5).numpy()
    responses = encoder.execute([{PIXEL_VALUES: _FakeTensor(PIXEL_VALUES, pixels)},
                                 {PIXEL_VALUES: _FakeTensor(PIXEL_VALUES, pixels[:, :1])},
                                 {PIXEL_VALUES: _FakeTensor(PIXEL_VALUES, pixels[:1])}])
    assert responses[1].error.code == _FakeTritonError.INVALID_ARG and "must have shape" in str(responses[1].error)
    (features,) = responses[0].output_tensors
    assert responses[0].error is None and features.name == IMAGE_FEATURES
    # batch 1 on its own vs. inside a batch of 2: only kernel choice differs
    np.testing.assert_allclose(responses[2].output_tensors[0].array, features.array[:1], rtol=0, atol=1e-5)

    projector = _load_adapter(PROJECTOR, monkeypatch)
    projector.initialize({"model_repository": str(repo / PROJECTOR), "model_version": "1",
                          "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    (response,) = projector.execute([{IMAGE_FEATURES: features}])
    (embeds,) = response.output_tensors
    assert embeds.name == IMAGE_EMBEDS and embeds.array.shape == (2, spec.num_image_tokens, spec.text_hidden_size)


# --- TensorRT: cannot run here ---

def test_tensorrt_unavailable_is_clear(tmp_path, checkpoint, exported):
    _, path = checkpoint
    if trt_export.tensorrt_available():
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises(trt_export.TensorRTUnavailableError, match="--engine pytorch"):
        trt_export.build_engine(tmp_path / "x.onnx", tmp_path / "model.plan", PIXEL_VALUES, (3, 32, 32), 4)
    with pytest.raises(trt_export.TensorRTUnavailableError, match="TensorRT is not available"):
        export_vision(path, tmp_path / "repo", tmp_path / "work", exported[3], SERVING, "tensorrt")
    assert not (tmp_path / "work").exists()  # refused before any slow work
    with pytest.raises(ValueError, match="engine must be one of"):
        export_vision(path, tmp_path / "repo", tmp_path / "work", exported[3], SERVING, "onnxruntime")


def test_tensorrt_io_dtype_is_checked_first(tmp_path):
    with pytest.raises(ValueError, match="io_dtype must be one of"):
        trt_export.build_engine(tmp_path / "x.onnx", tmp_path / "model.plan", PIXEL_VALUES, (3, 32, 32), 4,
                                io_dtype="bfloat16")
