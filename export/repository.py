"""Every `config.pbtxt` of the model repository, built from one place.

Configs are built as Triton's own `ModelConfig` protobuf messages (tritonclient ships the
schema as `model_config_pb2`), so a misspelt field or a wrong type fails here, not at server
start, and every size comes from `ModelSpec` / `ServingConfig`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from llava_triton import spec
from llava_triton.spec import ModelSpec, ServingConfig

ENGINES = ("pytorch", "tensorrt")
SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"

_SAMPLING_TYPES = {
    spec.IN_MAX_TOKENS: mc.TYPE_INT32,
    spec.IN_TEMPERATURE: mc.TYPE_FP32,
    spec.IN_TOP_P: mc.TYPE_FP32,
    spec.IN_TOP_K: mc.TYPE_INT32,
    spec.IN_SEED: mc.TYPE_INT64,
    spec.IN_STOP: mc.TYPE_STRING,
    spec.IN_STREAM: mc.TYPE_BOOL,
    spec.IN_IGNORE_EOS: mc.TYPE_BOOL,
}


def _tensor(message_type, name: str, data_type: int, dims: list[int], optional: bool = False):
    tensor = message_type(name=name, data_type=data_type, dims=dims)
    if optional:
        tensor.optional = True
    return tensor


def _input(name, data_type, dims, optional=False) -> mc.ModelInput:
    return _tensor(mc.ModelInput, name, data_type, dims, optional)


def _output(name, data_type, dims) -> mc.ModelOutput:
    return _tensor(mc.ModelOutput, name, data_type, dims)


def _sampling_inputs() -> list[mc.ModelInput]:
    return [_input(name, dtype, [-1] if name == spec.IN_STOP else [1], optional=True)
            for name, dtype in _SAMPLING_TYPES.items()]


def _generation_outputs() -> list[mc.ModelOutput]:
    return [
        _output(spec.OUT_TEXT, mc.TYPE_STRING, [1]),
        _output(spec.OUT_TOKEN_IDS, mc.TYPE_INT64, [-1]),
        _output(spec.OUT_PROMPT_TOKENS, mc.TYPE_INT32, [1]),
        _output(spec.OUT_COMPLETION_TOKENS, mc.TYPE_INT32, [1]),
        _output(spec.OUT_FINISH_REASON, mc.TYPE_STRING, [1]),
    ]


def _instances(count: int, serving: ServingConfig, cpu_only: bool = False) -> list[mc.ModelInstanceGroup]:
    # Without a `gpus` list Triton places `count` instances on every visible GPU.
    kind = "KIND_CPU" if cpu_only else serving.instance_kind
    group = mc.ModelInstanceGroup(count=count, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    if kind == "KIND_GPU" and serving.gpus:
        group.gpus.extend(serving.gpus)
    return [group]


def _queue_policy(serving: ServingConfig) -> mc.ModelQueuePolicy:
    # A full queue refuses new requests at once (UNAVAILABLE) instead of letting them time out.
    return mc.ModelQueuePolicy(max_queue_size=serving.max_queue_size, default_timeout_microseconds=serving.queue_timeout_us,
                               timeout_action=mc.ModelQueuePolicy.REJECT)


def model_configs(model: ModelSpec, serving: ServingConfig, engine: str) -> dict[str, mc.ModelConfig]:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    pixel_dims = [model.num_channels, model.image_size, model.image_size]
    features_dims = [model.num_image_tokens, model.vision_hidden_size]
    embeds_dims = [model.num_image_tokens, model.text_hidden_size]
    # pixel_values, image_features and image_embeds: FP16 for half-precision models, FP32 otherwise.
    wire = mc.DataType.Value(f"TYPE_{spec.wire_type_name(serving)}")

    preprocess = mc.ModelConfig(
        name=spec.PREPROCESS, backend="python", max_batch_size=0,
        input=[_input(spec.IN_IMAGES, mc.TYPE_STRING, [-1], optional=True),
               _input(spec.IN_PROMPT, mc.TYPE_STRING, [1], optional=True), *_sampling_inputs()],
        output=[_output(spec.INPUT_IDS, mc.TYPE_INT64, [-1]),
                _output(spec.PIXEL_VALUES, wire, [-1, *pixel_dims])],
        # Image decoding is CPU work whatever the device: several CPU instances.
        instance_group=_instances(serving.preprocess_instances, serving, cpu_only=True),
    )

    def vision_model(name: str, input_name: str, input_dims: list[int], output_name: str, output_dims: list[int],
                     instances: int):
        config = mc.ModelConfig(
            name=name, max_batch_size=serving.vision_max_batch_size,
            input=[_input(input_name, wire, input_dims)],
            output=[_output(output_name, wire, output_dims)],
            dynamic_batching=mc.ModelDynamicBatching(
                preferred_batch_size=list(serving.vision_preferred_batch_sizes),
                max_queue_delay_microseconds=serving.vision_max_queue_delay_us,
                default_queue_policy=_queue_policy(serving)),
            instance_group=_instances(instances, serving),
        )
        if engine == "tensorrt":
            config.platform = "tensorrt_plan"
        else:
            config.backend = "python"
        return config

    vision_encoder = vision_model(spec.VISION_ENCODER, spec.PIXEL_VALUES, pixel_dims, spec.IMAGE_FEATURES, features_dims,
                                  serving.vision_instances)
    projector = vision_model(spec.PROJECTOR, spec.IMAGE_FEATURES, features_dims, spec.IMAGE_EMBEDS, embeds_dims,
                             serving.projector_instances or serving.vision_instances)

    # The language model takes the projector's output, or with projector_placement "language_model"
    # the vision encoder's and projects it itself.
    in_language_model = serving.projector_in_language_model
    image_input = spec.language_model_image_input(serving)
    language_model = mc.ModelConfig(
        name=spec.LANGUAGE_MODEL, backend="python", max_batch_size=0,
        input=[_input(spec.INPUT_IDS, mc.TYPE_INT64, [-1]),
               _input(image_input, wire, [-1, *(features_dims if in_language_model else embeds_dims)], optional=True),
               *_sampling_inputs()],
        output=_generation_outputs(),
        # Decoupled: any number of responses per request (streaming); the model batches in flight.
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        instance_group=_instances(serving.language_model_instances, serving),
    )

    def step(model_name: str, inputs: dict[str, str], outputs: dict[str, str]):
        return mc.ModelEnsembling.Step(model_name=model_name, model_version=-1, input_map=inputs, output_map=outputs)

    sampling = {name: name for name in _SAMPLING_TYPES}
    ensemble = mc.ModelConfig(
        name=spec.ENSEMBLE, platform="ensemble", max_batch_size=0,
        input=[_input(spec.IN_IMAGES, mc.TYPE_STRING, [-1], optional=True),
               _input(spec.IN_PROMPT, mc.TYPE_STRING, [1], optional=True), *_sampling_inputs()],
        output=_generation_outputs(),
        ensemble_scheduling=mc.ModelEnsembling(step=[
            # Sampling inputs go to preprocess too, so bad values are refused before any image work.
            step(spec.PREPROCESS, {spec.IN_IMAGES: spec.IN_IMAGES, spec.IN_PROMPT: spec.IN_PROMPT, **sampling},
                 {spec.INPUT_IDS: spec.INPUT_IDS, spec.PIXEL_VALUES: spec.PIXEL_VALUES}),
            step(spec.VISION_ENCODER, {spec.PIXEL_VALUES: spec.PIXEL_VALUES}, {spec.IMAGE_FEATURES: spec.IMAGE_FEATURES}),
            *([] if in_language_model else [
                step(spec.PROJECTOR, {spec.IMAGE_FEATURES: spec.IMAGE_FEATURES}, {spec.IMAGE_EMBEDS: spec.IMAGE_EMBEDS})]),
            step(spec.LANGUAGE_MODEL, {spec.INPUT_IDS: spec.INPUT_IDS, image_input: image_input, **sampling},
                 {name: name for name in (spec.OUT_TEXT, spec.OUT_TOKEN_IDS, spec.OUT_PROMPT_TOKENS,
                                          spec.OUT_COMPLETION_TOKENS, spec.OUT_FINISH_REASON)}),
        ]),
    )
    configs = [preprocess, vision_encoder, *([] if in_language_model else [projector]), language_model, ensemble]
    return {c.name: c for c in configs}


def write_configs(repository: Path, model: ModelSpec, serving: ServingConfig, engine: str) -> list[Path]:
    """Write each model's config.pbtxt and spec file; copy the model.py adapters if needed. A model
    an earlier export wrote that this one does not have (the projector, with projector_placement
    "language_model") is removed, so that Triton does not load it."""
    written = []
    configs = model_configs(model, serving, engine)
    left_out = [name for name in spec.MODEL_NAMES if name not in configs]
    for name in left_out:
        if (Path(repository) / name).resolve() == (SOURCE_REPOSITORY / name).resolve():
            # Triton would load the directory's tracked model.py even without a config.pbtxt, and fail.
            raise ValueError(f"this export has no {name} model (projector_placement={serving.projector_placement}), "
                             f"but {SOURCE_REPOSITORY / name} keeps its tracked adapter, which Triton would load: "
                             "export to another directory with --output")
    for name in left_out:
        model_dir = Path(repository) / name
        if model_dir.is_dir():
            shutil.rmtree(model_dir)  # an earlier export's: Triton must not load it
    for name, config in configs.items():
        model_dir = Path(repository) / name
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        source_adapter = SOURCE_REPOSITORY / name / "1" / "model.py"
        uses_adapter = config.backend == "python"
        if uses_adapter and not (version_dir / "model.py").exists():
            shutil.copy2(source_adapter, version_dir / "model.py")
        if not uses_adapter and (version_dir / "model.py").exists() and model_dir.resolve() != (SOURCE_REPOSITORY / name).resolve():
            (version_dir / "model.py").unlink()  # a TensorRT model must not also look like a Python one
        spec.write_spec(version_dir, model, serving)
        path = model_dir / "config.pbtxt"
        path.write_text(text_format.MessageToString(config))
        written.append(path)
    return written


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
