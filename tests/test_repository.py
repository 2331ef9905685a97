"""Every config.pbtxt is built from the spec and parses as Triton's ModelConfig."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.repository import ENGINES, model_configs, read_config, write_configs
from llava_triton import spec
from llava_triton.spec import ModelSpec, ServingConfig, read_spec

MODEL = ModelSpec(image_size=336, patch_size=14, num_channels=3, vision_hidden_size=1024, text_hidden_size=4096,
                  vocab_size=32064, image_token_index=32000, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", max_position_embeddings=4096, eos_token_id=(2,))
# LLaVA-NeXT-Video-7B's sizes.
VIDEO_MODEL = dataclasses.replace(MODEL, model_type="llava_next_video", image_token_index=32001,
                                  video_token_index=32000, spatial_pool_mode="average", spatial_pool_stride=2,
                                  image_grid_pinpoints=((336, 672), (672, 336), (672, 672)))


def dims(tensors, name):
    return [list(t.dims) for t in tensors if t.name == name][0]


def test_sizes_come_from_the_checkpoint_spec():
    configs = model_configs(MODEL, ServingConfig(), "pytorch")
    assert set(configs) == set(spec.MODEL_NAMES)
    assert MODEL.num_image_tokens == 576
    assert dims(configs[spec.VISION_ENCODER].input, spec.PIXEL_VALUES) == [3, 336, 336]
    assert dims(configs[spec.VISION_ENCODER].output, spec.IMAGE_FEATURES) == [576, 1024]
    assert dims(configs[spec.PROJECTOR].output, spec.IMAGE_EMBEDS) == [576, 4096]
    assert dims(configs[spec.LANGUAGE_MODEL].input, spec.IMAGE_EMBEDS) == [-1, 576, 4096]
    full = ModelSpec(**{**MODEL.to_dict(), "vision_feature_select_strategy": "full"})
    projector = model_configs(full, ServingConfig(), "pytorch")[spec.PROJECTOR]
    assert dims(projector.output, spec.IMAGE_EMBEDS) == [577, 4096]


def test_batching_and_instances_follow_serving_config():
    serving = ServingConfig(vision_max_batch_size=16, vision_preferred_batch_sizes=(4, 16),
                            vision_max_queue_delay_us=500,
                            instance_kind="KIND_GPU", vision_instances=2, preprocess_instances=3, max_queue_size=9)
    configs = model_configs(MODEL, serving, "pytorch")
    encoder = configs[spec.VISION_ENCODER]
    assert encoder.max_batch_size == 16
    assert list(encoder.dynamic_batching.preferred_batch_size) == [4, 16]
    assert encoder.dynamic_batching.max_queue_delay_microseconds == 500
    assert encoder.dynamic_batching.default_queue_policy.max_queue_size == 9
    assert encoder.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and encoder.instance_group[0].count == 2
    assert configs[spec.PROJECTOR].instance_group[0].count == 2  # projector_instances 0: as many as the encoder
    more = model_configs(MODEL, dataclasses.replace(serving, projector_instances=5), "pytorch")
    assert (more[spec.PROJECTOR].instance_group[0].count, more[spec.VISION_ENCODER].instance_group[0].count) == (5, 2)
    with pytest.raises(ValueError, match="projector_instances must be 0"):
        ServingConfig(projector_instances=-1)
    with pytest.raises(ValueError, match="instances_of takes 'vision_encoder' or 'projector', got 'preprocess'"):
        serving.instances_of(spec.PREPROCESS)
    assert not encoder.instance_group[0].gpus  # one set of instances on every visible GPU
    assert configs[spec.PREPROCESS].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert configs[spec.PREPROCESS].instance_group[0].count == 3
    assert configs[spec.LANGUAGE_MODEL].model_transaction_policy.decoupled
    assert configs[spec.LANGUAGE_MODEL].instance_group[0].count == 1


def test_instances_can_be_pinned_to_gpus():
    serving = ServingConfig(instance_kind="KIND_GPU", language_model_instances=2, gpus=(0,))
    configs = model_configs(MODEL, serving, "pytorch")
    group = configs[spec.LANGUAGE_MODEL].instance_group[0]
    assert (group.count, list(group.gpus)) == (2, [0])
    assert list(configs[spec.VISION_ENCODER].instance_group[0].gpus) == [0]
    assert not configs[spec.PREPROCESS].instance_group[0].gpus  # CPU work
    assert ServingConfig.from_dict({"gpus": [0, 1]}).gpus == (0, 1)
    with pytest.raises(ValueError, match="gpus must be GPU indices"):
        ServingConfig(gpus=(-1,))


@pytest.mark.parametrize("engine", ENGINES)
def test_projector_in_the_language_model(engine):
    """projector_placement "language_model": no projector model or step; the language model takes
    the vision encoder's features."""
    configs = model_configs(MODEL, ServingConfig(projector_placement="language_model"), engine)
    assert spec.PROJECTOR not in configs
    assert [step.model_name for step in configs[spec.ENSEMBLE].ensemble_scheduling.step] == [
        spec.PREPROCESS, spec.VISION_ENCODER, spec.LANGUAGE_MODEL]
    assert dims(configs[spec.LANGUAGE_MODEL].input, spec.IMAGE_FEATURES) == [-1, 576, 1024]
    assert spec.IMAGE_EMBEDS not in {t.name for t in configs[spec.LANGUAGE_MODEL].input}
    assert configs[spec.LANGUAGE_MODEL].backend == "python"


def test_an_export_without_the_projector_refuses_this_repositorys_own_directory(tmp_path):
    from export.repository import SOURCE_REPOSITORY

    before = sorted(p.relative_to(SOURCE_REPOSITORY) for p in SOURCE_REPOSITORY.rglob("*"))
    with pytest.raises(ValueError, match="this export has no projector model .* export to another directory"):
        write_configs(SOURCE_REPOSITORY, MODEL, ServingConfig(projector_placement="language_model"), "pytorch")
    assert sorted(p.relative_to(SOURCE_REPOSITORY) for p in SOURCE_REPOSITORY.rglob("*")) == before  # untouched


# The public contract as clients rely on it, written out here on purpose (not read from spec.INPUTS):
# a change to spec.INPUTS / spec.OUTPUTS that changes what clients send or receive fails here.
CONTRACT_INPUTS = {spec.IN_PROMPT: (mc.TYPE_STRING, [1]), spec.IN_MESSAGES: (mc.TYPE_STRING, [1]),
                   spec.IN_IMAGES: (mc.TYPE_STRING, [-1]), spec.IN_VIDEOS: (mc.TYPE_STRING, [-1]),
                   spec.IN_NUM_FRAMES: (mc.TYPE_INT32, [1]), spec.IN_FPS: (mc.TYPE_FP32, [1]),
                   spec.IN_MAX_TOKENS: (mc.TYPE_INT32, [1]), spec.IN_TEMPERATURE: (mc.TYPE_FP32, [1]),
                   spec.IN_TOP_P: (mc.TYPE_FP32, [1]), spec.IN_TOP_K: (mc.TYPE_INT32, [1]),
                   spec.IN_SEED: (mc.TYPE_INT64, [1]), spec.IN_STOP: (mc.TYPE_STRING, [-1]),
                   spec.IN_STREAM: (mc.TYPE_BOOL, [1]), spec.IN_IGNORE_EOS: (mc.TYPE_BOOL, [1]),
                   spec.IN_CACHE_SALT: (mc.TYPE_STRING, [1])}
CONTRACT_OUTPUTS = {spec.OUT_TEXT: (mc.TYPE_STRING, [1]), spec.OUT_TOKEN_IDS: (mc.TYPE_INT64, [-1]),
                    spec.OUT_PROMPT_TOKENS: (mc.TYPE_INT32, [1]), spec.OUT_COMPLETION_TOKENS: (mc.TYPE_INT32, [1]),
                    spec.OUT_FINISH_REASON: (mc.TYPE_STRING, [1])}


def test_the_ensemble_has_the_public_contract():
    configs = model_configs(MODEL, ServingConfig(), "pytorch")
    ensemble = configs[spec.ENSEMBLE]
    assert {t.name: (t.data_type, list(t.dims)) for t in ensemble.input} == CONTRACT_INPUTS
    assert all(t.optional for t in ensemble.input)
    assert {t.name: (t.data_type, list(t.dims)) for t in ensemble.output} == CONTRACT_OUTPUTS
    # preprocess takes all of it; the language model the sampling inputs and cache_salt, and it answers every
    # output.
    assert {t.name: (t.data_type, list(t.dims)) for t in configs[spec.PREPROCESS].input} == CONTRACT_INPUTS
    language_model = {t.name: (t.data_type, list(t.dims)) for t in configs[spec.LANGUAGE_MODEL].input}
    shared = (*spec.SAMPLING_INPUTS, spec.IN_CACHE_SALT)
    assert {name: language_model[name] for name in shared} == {name: CONTRACT_INPUTS[name] for name in shared}
    assert set(spec.SAMPLING_INPUTS) == set(CONTRACT_INPUTS) - {spec.IN_PROMPT, spec.IN_MESSAGES, spec.IN_IMAGES,
                                                                spec.IN_VIDEOS, spec.IN_NUM_FRAMES, spec.IN_FPS,
                                                                spec.IN_CACHE_SALT}
    assert {t.name: (t.data_type, list(t.dims)) for t in configs[spec.LANGUAGE_MODEL].output} == CONTRACT_OUTPUTS


def test_engines_share_one_tensor_contract():
    torch_configs = model_configs(MODEL, ServingConfig(), "pytorch")
    trt_configs = model_configs(MODEL, ServingConfig(), "tensorrt")
    for name in (spec.VISION_ENCODER, spec.PROJECTOR):
        assert torch_configs[name].backend == "python" and not torch_configs[name].platform
        assert trt_configs[name].platform == "tensorrt_plan" and not trt_configs[name].backend
        assert torch_configs[name].input == trt_configs[name].input
        assert torch_configs[name].output == trt_configs[name].output
    with pytest.raises(ValueError, match="unknown engine"):
        model_configs(MODEL, ServingConfig(), "onnx")


@pytest.mark.parametrize("model, placement", [(MODEL, "model"), (MODEL, "language_model"),
                                              (VIDEO_MODEL, "language_model")], ids=["llava", "llava projector in lm",
                                                                                     "llava_next_video"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ensemble_wiring_is_consistent(dtype, model, placement):
    configs = model_configs(model, ServingConfig(dtype=dtype, projector_placement=placement), "pytorch")
    ensemble = configs[spec.ENSEMBLE]
    available = {t.name: (t.data_type, t.optional) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        model_inputs = {t.name: t for t in model.input}
        assert set(step.input_map) <= set(model_inputs), step.model_name
        for model_input, tensor in step.input_map.items():
            assert tensor in available, f"{step.model_name} reads {tensor} before anything produces it"
            data_type, optional = available[tensor]
            assert data_type == model_inputs[model_input].data_type
            # An optional ensemble input may only feed an optional model input.
            assert not optional or model_inputs[model_input].optional
        for model_input in model_inputs.values():
            assert model_input.optional or model_input.name in step.input_map, (step.model_name, model_input.name)
        model_outputs = {t.name: t for t in model.output}
        for model_output, tensor in step.output_map.items():
            available[tensor] = (model_outputs[model_output].data_type, False)
    assert {t.name for t in ensemble.output} <= set(available)
    # Every input is optional so that a missing prompt reaches preprocess and gets a clear error
    # (Triton's ensemble would otherwise answer a request without it with an empty success).
    assert all(t.optional for t in ensemble.input)


def test_a_video_model_sends_frame_counts_to_the_language_model_which_projects():
    configs = model_configs(VIDEO_MODEL, ServingConfig(projector_placement="language_model"), "pytorch")
    assert spec.PROJECTOR not in configs
    assert dims(configs[spec.PREPROCESS].output, spec.VIDEO_FRAMES) == [-1]
    assert dims(configs[spec.LANGUAGE_MODEL].input, spec.VIDEO_FRAMES) == [-1]
    steps = {step.model_name: step for step in configs[spec.ENSEMBLE].ensemble_scheduling.step}
    assert spec.VIDEO_FRAMES in steps[spec.LANGUAGE_MODEL].input_map
    assert VIDEO_MODEL.num_frame_tokens == 144
    # Frames are pooled before the projector, so a projector model of its own cannot serve them.
    with pytest.raises(ValueError, match="projector_placement language_model"):
        model_configs(VIDEO_MODEL, ServingConfig(), "pytorch")
    # Models without videos carry no frame counts.
    assert spec.VIDEO_FRAMES not in {t.name for t in model_configs(MODEL, ServingConfig(), "pytorch")[
        spec.PREPROCESS].output}


def image_tensor_types(configs) -> dict[tuple[str, str], int]:
    """Data type of every pixel_values, image_features and image_embeds tensor, by (model, tensor)."""
    image_tensors = (spec.PIXEL_VALUES, spec.IMAGE_FEATURES, spec.IMAGE_EMBEDS)
    return {(config.name, tensor.name): tensor.data_type for config in configs.values()
            for tensor in (*config.input, *config.output) if tensor.name in image_tensors}


@pytest.mark.parametrize("dtype,wire,wire_dtype", [("float32", mc.TYPE_FP32, np.float32),
                                                   ("float16", mc.TYPE_FP16, np.float16),
                                                   ("bfloat16", mc.TYPE_FP16, np.float16)])
def test_image_tensors_travel_in_the_wire_dtype(dtype, wire, wire_dtype):
    serving = ServingConfig(dtype=dtype)
    assert spec.wire_dtype(serving) == wire_dtype
    assert f"TYPE_{spec.wire_type_name(serving)}" == mc.DataType.Name(wire)
    for engine in ENGINES:
        types = image_tensor_types(model_configs(MODEL, serving, engine))
        assert sorted(types) == sorted([
            (spec.PREPROCESS, spec.PIXEL_VALUES), (spec.VISION_ENCODER, spec.PIXEL_VALUES),
            (spec.VISION_ENCODER, spec.IMAGE_FEATURES), (spec.PROJECTOR, spec.IMAGE_FEATURES),
            (spec.PROJECTOR, spec.IMAGE_EMBEDS), (spec.LANGUAGE_MODEL, spec.IMAGE_EMBEDS)])
        assert set(types.values()) == {wire}, (engine, types)
    # Only those: the sampling inputs keep their types.
    ensemble = model_configs(MODEL, serving, "pytorch")[spec.ENSEMBLE]
    assert [t.data_type for t in ensemble.input if t.name == spec.IN_TEMPERATURE] == [mc.TYPE_FP32]


@pytest.mark.parametrize("dtype,wire", [("float32", mc.TYPE_FP32), ("bfloat16", mc.TYPE_FP16)])
def test_written_configs_say_the_wire_dtype(tmp_path, dtype, wire):
    write_configs(tmp_path, MODEL, ServingConfig(dtype=dtype), "pytorch")
    configs = {name: read_config(tmp_path / name / "config.pbtxt") for name in spec.MODEL_NAMES}
    assert set(image_tensor_types(configs).values()) == {wire}


def test_written_files_parse_back(tmp_path):
    serving = ServingConfig(max_num_seqs=7)
    write_configs(tmp_path, MODEL, serving, "pytorch")
    for name, expected in model_configs(MODEL, serving, "pytorch").items():
        assert read_config(tmp_path / name / "config.pbtxt") == expected
        assert read_spec(tmp_path / name / "1") == (MODEL, serving)
        assert (tmp_path / name / "1" / "model.py").exists() == (name != spec.ENSEMBLE)


def test_every_serving_option_says_what_it_means():
    options = spec.serving_options()
    assert [o.name for o in options] == [f.name for f in dataclasses.fields(ServingConfig)]
    for option in options:
        assert option.meaning and option.default == getattr(ServingConfig(), option.name), option.name
        assert option.default in option.choices or not option.choices, option.name


@pytest.mark.parametrize("option", [o for o in spec.serving_options() if o.choices], ids=lambda o: o.name)
def test_a_string_option_takes_only_its_values(option):
    with pytest.raises(ValueError, match=f"{option.name} must be {spec.one_of(option.choices)}, got 'bogus'"):
        ServingConfig(**{option.name: "bogus"})
    for value in option.choices:
        assert getattr(ServingConfig(**{option.name: value}), option.name) == value


def test_serving_config_refuses_bad_values():
    assert spec.one_of(("a",)) == "a" and spec.one_of(("a", "b", "c")) == "a, b or c"
    for name in spec.POSITIVE_OPTIONS:
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            ServingConfig(**{name: 0})
    with pytest.raises(ValueError, match="max_num_seqs must be positive"):
        ServingConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="must not exceed"):
        ServingConfig(vision_max_batch_size=8, vision_preferred_batch_sizes=(16,))
    with pytest.raises(ValueError, match="unknown serving options"):
        ServingConfig.from_dict({"max_num_seq": 3})


def test_export_cli_refuses_bad_settings_with_the_fields_name(tiny_checkpoint, tmp_path):
    from export.__main__ import main as export_main

    with pytest.raises(SystemExit, match="--set: projector_placement must be model or language_model, got 'vision'"):
        export_main(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "repo"), "--engine", "pytorch",
                     "--set", "projector_placement=vision"])
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("engine_args", [[], ["--engine", "auto"]])
def test_export_engine_default_and_auto_are_pytorch_even_where_tensorrt_imports(tiny_checkpoint, tmp_path, monkeypatch,
                                                                                capsys, engine_args):
    """The TensorRT path has never been run, so only `--engine tensorrt` takes it: not the default, and
    not `auto`, even where TensorRT imports and a GPU exists (as in NVIDIA's Triton image)."""
    from export import tensorrt
    from export.__main__ import main as export_main

    monkeypatch.setattr(tensorrt, "tensorrt_available", lambda: True)
    repo = tmp_path / "repo"
    assert export_main(["--model", str(tiny_checkpoint), "--output", str(repo), "--work-dir", str(tmp_path / "work"),
                        "--device", "cpu", "--no-onnx", *engine_args]) == 0
    assert "engine pytorch" in capsys.readouterr().out
    for name in (spec.VISION_ENCODER, spec.PROJECTOR):
        assert read_config(repo / name / "config.pbtxt").backend == "python"


def test_an_export_for_a_large_gpu_runs_several_vision_instances_unless_told():
    from export.__main__ import serving_config

    large, small = spec.GPU_VISION_INSTANCES_MIN_BYTES, spec.GPU_VISION_INSTANCES_MIN_BYTES - 1
    gpu = serving_config("cuda", "bfloat16", {}, large)
    assert (gpu.instance_kind, gpu.vision_instances) == ("KIND_GPU", spec.GPU_VISION_INSTANCES)
    assert gpu.instances_of(spec.PROJECTOR) == spec.GPU_VISION_INSTANCES
    assert serving_config("cuda", "bfloat16", {"vision_instances": 1}, large).vision_instances == 1
    smaller = serving_config("cuda", "bfloat16", {}, small)
    assert (smaller.instance_kind, smaller.vision_instances) == ("KIND_GPU", 1)
    assert serving_config("cuda", "bfloat16", {"vision_instances": 2}, small).vision_instances == 2
    cpu = serving_config("cpu", "float32", {})
    assert (cpu.instance_kind, cpu.vision_instances) == ("KIND_CPU", 1)
    encoder = model_configs(MODEL, gpu, "pytorch")[spec.VISION_ENCODER].instance_group[0]
    assert (encoder.kind, encoder.count) == (mc.ModelInstanceGroup.KIND_GPU, spec.GPU_VISION_INSTANCES)
