"""Every `config.pbtxt` of the model repository, built from one place.

Configs are built as Triton's own `ModelConfig` protobuf messages (tritonclient ships the
schema as `model_config_pb2`), so a misspelt field or a wrong type fails here, not at server
start, every size comes from `ModelSpec` / `ServingConfig`, and the ensemble's inputs and outputs
from `spec.INPUTS` / `spec.OUTPUTS`.
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


def config_type(datatype: str) -> int:
    """config.pbtxt's type of a Triton datatype name (spec.NUMPY_DTYPES): BYTES is TYPE_STRING there."""
    return mc.TYPE_STRING if datatype == "BYTES" else mc.DataType.Value(f"TYPE_{datatype}")


def _tensor(message_type, name: str, data_type: int, dims: list[int], optional: bool = False):
    tensor = message_type(name=name, data_type=data_type, dims=dims)
    if optional:
        tensor.optional = True
    return tensor


def _input(name, data_type, dims, optional=False) -> mc.ModelInput:
    return _tensor(mc.ModelInput, name, data_type, dims, optional)


def _output(name, data_type, dims) -> mc.ModelOutput:
    return _tensor(mc.ModelOutput, name, data_type, dims)


def contract_inputs(names: tuple[str, ...] | None = None) -> list[mc.ModelInput]:
    """The ensemble's inputs (spec.INPUTS), or those named. Every one is optional, `prompt` too: a
    request without it reaches preprocess and gets a clear error, where Triton's ensemble would answer
    it with an empty success."""
    return [_input(t.name, config_type(t.datatype), list(t.shape), optional=True)
            for t in spec.INPUTS if names is None or t.name in names]


def contract_outputs() -> list[mc.ModelOutput]:
    """The outputs of the ensemble and of the language model, in every response (spec.OUTPUTS)."""
    return [_output(t.name, config_type(t.datatype), list(t.shape)) for t in spec.OUTPUTS]


def _instances(count: int, serving: ServingConfig, cpu_only: bool = False) -> list[mc.ModelInstanceGroup]:
    # Without a `gpus` list Triton places `count` instances on every visible GPU.
    kind = "KIND_CPU" if cpu_only else serving.instance_kind
    group = mc.ModelInstanceGroup(count=count, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    if kind == "KIND_GPU" and serving.gpus:
        group.gpus.extend(serving.gpus)
    return [group]


def _queue_policy(serving: ServingConfig) -> mc.ModelQueuePolicy:
    # A full queue refuses new requests at once (UNAVAILABLE) instead of letting them time out.
    return mc.ModelQueuePolicy(max_queue_size=serving.max_queue_size,
                               default_timeout_microseconds=serving.queue_timeout_us,
                               timeout_action=mc.ModelQueuePolicy.REJECT)


def model_configs(model: ModelSpec, serving: ServingConfig, engine: str) -> dict[str, mc.ModelConfig]:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    pixel_dims = [model.num_channels, model.image_size, model.image_size]
    features_dims = [model.num_image_tokens, model.vision_hidden_size]
    embeds_dims = [model.num_image_tokens, model.text_hidden_size]
    # pixel_values, image_features and image_embeds: FP16 for half-precision models, FP32 otherwise.
    wire = config_type(spec.wire_type_name(serving))
    # LLaVA-NeXT: preprocess tells the language model each image's size, from which it packs the tiles.
    anyres = model.anyres
    image_sizes = (spec.IMAGE_SIZES,) if anyres else ()
    # LLaVA-NeXT-Video: and how many frames each video's tiles are (their features are pooled there).
    video_frames = (spec.VIDEO_FRAMES,) if model.videos else ()
    if model.videos and not serving.projector_in_language_model:
        raise ValueError("a llava_next_video model pools each frame's features before the projector, which the "
                         "language model does: export it with projector_placement language_model")
    # Each image's content key, and whether its tiles were left out (the embedding cache holds it).
    image_cache = (spec.IMAGE_KEYS, spec.IMAGE_CACHED)

    preprocess = mc.ModelConfig(
        name=spec.PREPROCESS, backend="python", max_batch_size=0,
        input=contract_inputs(),
        output=[_output(spec.INPUT_IDS, mc.TYPE_INT64, [-1]),
                _output(spec.PIXEL_VALUES, wire, [-1, *pixel_dims]),
                _output(spec.IMAGE_KEYS, mc.TYPE_UINT8, [-1, spec.IMAGE_KEY_BYTES]),
                _output(spec.IMAGE_CACHED, mc.TYPE_BOOL, [-1]),
                *([_output(spec.IMAGE_SIZES, mc.TYPE_INT64, [-1, 2])] if anyres else []),
                *[_output(name, mc.TYPE_INT64, [-1]) for name in video_frames]],
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

    vision_encoder = vision_model(spec.VISION_ENCODER, spec.PIXEL_VALUES, pixel_dims, spec.IMAGE_FEATURES,
                                  features_dims, serving.instances_of(spec.VISION_ENCODER))
    projector = vision_model(spec.PROJECTOR, spec.IMAGE_FEATURES, features_dims, spec.IMAGE_EMBEDS, embeds_dims,
                             serving.instances_of(spec.PROJECTOR))

    # The language model takes the projector's output, or with projector_placement "language_model"
    # the vision encoder's and projects it itself.
    in_language_model = serving.projector_in_language_model
    image_input = spec.language_model_image_input(serving)
    language_model = mc.ModelConfig(
        name=spec.LANGUAGE_MODEL, backend="python", max_batch_size=0,
        input=[_input(spec.INPUT_IDS, mc.TYPE_INT64, [-1]),
               _input(image_input, wire, [-1, *(features_dims if in_language_model else embeds_dims)], optional=True),
               *([_input(spec.IMAGE_SIZES, mc.TYPE_INT64, [-1, 2], optional=True)] if anyres else []),
               *[_input(name, mc.TYPE_INT64, [-1], optional=True) for name in video_frames],
               _input(spec.IMAGE_KEYS, mc.TYPE_UINT8, [-1, spec.IMAGE_KEY_BYTES], optional=True),
               _input(spec.IMAGE_CACHED, mc.TYPE_BOOL, [-1], optional=True),
               *contract_inputs((*spec.SAMPLING_INPUTS, spec.IN_CACHE_SALT))],
        output=contract_outputs(),
        # Decoupled: any number of responses per request (streaming); the model batches in flight.
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        instance_group=_instances(serving.language_model_instances, serving),
    )

    def step(model_name: str, inputs: dict[str, str], outputs: dict[str, str]):
        return mc.ModelEnsembling.Step(model_name=model_name, model_version=-1, input_map=inputs, output_map=outputs)

    def same_names(*names: str) -> dict[str, str]:
        return {name: name for name in names}

    ensemble = mc.ModelConfig(
        name=spec.ENSEMBLE, platform="ensemble", max_batch_size=0,
        input=contract_inputs(),
        output=contract_outputs(),
        ensemble_scheduling=mc.ModelEnsembling(step=[
            # Sampling inputs go to preprocess too, so bad values are refused before any image work.
            step(spec.PREPROCESS, same_names(*(t.name for t in spec.INPUTS)),
                 same_names(spec.INPUT_IDS, spec.PIXEL_VALUES, *image_cache, *image_sizes, *video_frames)),
            step(spec.VISION_ENCODER, same_names(spec.PIXEL_VALUES), same_names(spec.IMAGE_FEATURES)),
            *([] if in_language_model else [
                step(spec.PROJECTOR, same_names(spec.IMAGE_FEATURES), same_names(spec.IMAGE_EMBEDS))]),
            step(spec.LANGUAGE_MODEL, same_names(spec.INPUT_IDS, image_input, *image_cache, *image_sizes,
                                                 *video_frames, *spec.SAMPLING_INPUTS, spec.IN_CACHE_SALT),
                 same_names(*(t.name for t in spec.OUTPUTS))),
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
        in_source = model_dir.resolve() == (SOURCE_REPOSITORY / name).resolve()
        if uses_adapter and not in_source:
            # Always this checkout's adapter: one left by an export from an older version would serve
            # the new artifacts with old code.
            shutil.copy2(source_adapter, version_dir / "model.py")
        if not uses_adapter and (version_dir / "model.py").exists() and not in_source:
            (version_dir / "model.py").unlink()  # a TensorRT model must not also look like a Python one
        spec.write_spec(version_dir, model, serving)
        path = model_dir / "config.pbtxt"
        path.write_text(text_format.MessageToString(config))
        written.append(path)
    return written


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
