import os, sys; sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
# ^ the stub ignores PYTHONPATH
# Triton adapter for the language model: decoupled, in-flight batched (llava_triton.engine).

import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from llava_triton import spec
from llava_triton.dtypes import resolve_dtype
from llava_triton.engine import Engine, Metrics, Output
from llava_triton.anyres import load_image_newline
from llava_triton.embedding_cache import Directory, EmbeddingCache, directory_name
from llava_triton.llama import LlamaForCausalLM
from llava_triton.lm_runtime import prepare_language_model
from llava_triton.outbox import ThreadedOutbox
from llava_triton.processor import load_processor
from llava_triton.sampling import SamplingParams
from llava_triton.triton_utils import (cache_salt, freeze_loaded_objects, instance_device, is_decoupled, load_spec,
                                      optional_inputs, triton_error, version_dir)
from llava_triton.vision_serving import load_serving_projector


class ResponseSink:
    """Sends a request's outputs through its response sender (callable from the engine thread)."""

    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()
        # After the final response Triton frees the request: asking it anything then crashes the
        # server (TRITONBACKEND_ResponseFactoryIsCancelled on a released factory).
        self.closed = False

    def send(self, output: Output) -> None:
        tensors = [
            pb_utils.Tensor(spec.OUT_TEXT, np.array([output.text.encode("utf-8")], dtype=object)),
            pb_utils.Tensor(spec.OUT_TOKEN_IDS, np.array(output.token_ids, dtype=np.int64)),
            pb_utils.Tensor(spec.OUT_PROMPT_TOKENS, np.array([output.prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor(spec.OUT_COMPLETION_TOKENS, np.array([output.completion_tokens], dtype=np.int32)),
            pb_utils.Tensor(spec.OUT_FINISH_REASON, np.array([output.finish_reason.encode()], dtype=object)),
        ]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if output.final else 0
        self.closed = self.closed or output.final
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

    def error(self, message: str) -> None:
        self.fail(pb_utils.TritonError(message))

    def fail(self, error) -> None:
        self.closed = True
        self.sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def cancelled(self) -> bool:
        return not self.closed and self.request.is_cancelled()


class TritonMetrics(Metrics):
    """The engine's metrics as Triton custom metrics, served on the metrics port (/metrics).

    Every update is an IPC round trip to the server, so each is handed to the outbox's thread
    instead of being made on the engine's.
    """

    LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24]

    def __init__(self, outbox: ThreadedOutbox):
        self._outbox = outbox
        self._last_occupancy = None
        # A Metric is only valid while its MetricFamily lives: keep both.
        self._families = []

        def family(definition: spec.Metric):
            kind = getattr(pb_utils.MetricFamily, definition.kind.upper())  # COUNTER, GAUGE or HISTOGRAM
            self._families.append(pb_utils.MetricFamily(definition.name, definition.help, kind))
            return self._families[-1]

        def metric(definition: spec.Metric, **options):
            return family(definition).Metric(**options)

        self._ttft = metric(spec.METRIC_TIME_TO_FIRST_TOKEN, buckets=self.LATENCY_BUCKETS)
        self._itl = metric(spec.METRIC_INTER_TOKEN_LATENCY, buckets=self.LATENCY_BUCKETS)
        self._prompt = metric(spec.METRIC_PROMPT_TOKENS)
        self._generated = metric(spec.METRIC_GENERATION_TOKENS)
        self._running = metric(spec.METRIC_REQUESTS_RUNNING)
        self._waiting = metric(spec.METRIC_REQUESTS_WAITING)
        self._kv = metric(spec.METRIC_KV_CACHE_USAGE)
        self._kv_free_blocks = metric(spec.METRIC_KV_CACHE_FREE_BLOCKS)
        self._kv_cached_blocks = metric(spec.METRIC_KV_CACHE_CACHED_BLOCKS)
        self._prefix_query = metric(spec.METRIC_PREFIX_QUERY_TOKENS)
        self._prefix_hits = metric(spec.METRIC_PREFIX_HIT_TOKENS)
        self._prefix_ratio = metric(spec.METRIC_PREFIX_HIT_RATIO)
        self._prefix_totals = [0, 0]  # query and hit tokens since the start, for the ratio
        self._embedding_hits = metric(spec.METRIC_EMBEDDING_CACHE_HITS)
        self._embedding_misses = metric(spec.METRIC_EMBEDDING_CACHE_MISSES)
        self._embedding_evictions = metric(spec.METRIC_EMBEDDING_CACHE_EVICTIONS)
        self._embedding_bytes = metric(spec.METRIC_EMBEDDING_CACHE_BYTES)
        self._refused_family = family(spec.METRIC_REQUESTS_REFUSED)  # a series per reason, made when first counted
        self._refused = {}

    def request_refused(self, reason: str) -> None:
        self._outbox.call(self._refuse, reason)

    def _refuse(self, reason: str) -> None:
        if reason not in self._refused:
            self._refused[reason] = self._refused_family.Metric(labels={spec.METRIC_REQUESTS_REFUSED.label: reason})
        self._refused[reason].increment(1)

    def prompt_tokens(self, count: int) -> None:
        self._outbox.call(self._prompt.increment, count)

    def generated_tokens(self, first_token_s: list[float], inter_token_s: list[float]) -> None:
        if first_token_s or inter_token_s:
            self._outbox.call(self._record_tokens, first_token_s, inter_token_s)

    def _record_tokens(self, first_token_s: list[float], inter_token_s: list[float]) -> None:
        self._generated.increment(len(first_token_s) + len(inter_token_s))
        for seconds in first_token_s:
            self._ttft.observe(seconds)
        for seconds in inter_token_s:
            self._itl.observe(seconds)

    def occupancy(self, running: int, waiting: int, kv_cache_usage: float, free_blocks: int,
                  cached_blocks: int = 0) -> None:
        state = (running, waiting, kv_cache_usage, free_blocks, cached_blocks)
        if state != self._last_occupancy:  # unchanged: no IPC
            self._last_occupancy = state
            self._outbox.call(self._set_occupancy, *state)

    def _set_occupancy(self, running: int, waiting: int, kv_cache_usage: float, free_blocks: int,
                       cached_blocks: int) -> None:
        # The cache's gauges first: a scrape between two sets never shows a running request holding no blocks.
        self._kv.set(kv_cache_usage)
        self._kv_free_blocks.set(free_blocks)
        self._kv_cached_blocks.set(cached_blocks)
        self._running.set(running)
        self._waiting.set(waiting)

    def prefix_cache(self, prompt_tokens: int, hit_tokens: int) -> None:
        self._outbox.call(self._record_prefix, prompt_tokens, hit_tokens)

    def _record_prefix(self, prompt_tokens: int, hit_tokens: int) -> None:
        self._prefix_totals[0] += prompt_tokens
        self._prefix_totals[1] += hit_tokens
        self._prefix_query.increment(prompt_tokens)
        if hit_tokens:
            self._prefix_hits.increment(hit_tokens)
        self._prefix_ratio.set(self._prefix_totals[1] / max(self._prefix_totals[0], 1))

    def embedding_cache(self, hits: int, misses: int, evictions: int, cached_bytes: int) -> None:
        self._outbox.call(self._record_embedding_cache, hits, misses, evictions, cached_bytes)

    def _record_embedding_cache(self, hits: int, misses: int, evictions: int, cached_bytes: int) -> None:
        for counter, count in ((self._embedding_hits, hits), (self._embedding_misses, misses),
                               (self._embedding_evictions, evictions)):
            if count:
                counter.increment(count)
        self._embedding_bytes.set(cached_bytes)


class TritonPythonModel:
    def initialize(self, args):
        if not is_decoupled(args):
            raise pb_utils.TritonModelException("language_model must be decoupled (model_transaction_policy)")
        self.model_spec, self.serving = load_spec(args)
        sys.setswitchinterval(self.serving.gil_switch_interval_s)
        directory = version_dir(args)
        device = instance_device(args)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        model = LlamaForCausalLM.from_pretrained(directory, device=device, dtype=resolve_dtype(self.serving.dtype))
        tokenizer = load_processor(directory / spec.PROCESSOR_DIR).tokenizer  # as the preprocess model loads it
        # With projector_placement "language_model" requests carry the vision encoder's features and
        # the engine projects them (the projector's weights are in a directory of this version's).
        self.image_input = spec.language_model_image_input(self.serving)
        projector = None
        if self.serving.projector_in_language_model:
            projector = load_serving_projector(directory / spec.LANGUAGE_MODEL_PROJECTOR_DIR, device, self.serving)
        image_newline = load_image_newline(directory) if self.model_spec.anyres else None
        # Responses, metric updates and cancellation checks leave from the outbox's thread.
        self.outbox = ThreadedOutbox()
        # The caches' directory: its secret keys every image (preprocess reads it), and it lists the
        # images the embedding cache holds. Made before the KV cache is sized, from what memory is left.
        self.directory = None
        self.embedding_cache = None
        if self.serving.prefix_caching or self.serving.embedding_cache_bytes:
            self.directory = Directory.create(directory_name(directory.parent.parent, os.getppid()))
        if self.serving.embedding_cache_bytes and self.directory.usable:
            self.embedding_cache = EmbeddingCache(self.serving.embedding_cache_bytes,
                                                  self.serving.embedding_cache_grace_s, self.directory)
        # Fused, quantised, KV cache allocated, compiled and captured before the engine gets it.
        runtime = prepare_language_model(model, self.model_spec, self.serving)
        self.engine = Engine(runtime, tokenizer, self.model_spec, self.serving, TritonMetrics(self.outbox), self.outbox,
                             projector, image_newline, self.embedding_cache)
        freeze_loaded_objects()  # after compiling and capturing: the engine thread starts next
        self.stop = threading.Event()
        self.loop = threading.Thread(target=self.engine.run, args=(self.stop,), name="llava-engine", daemon=True)
        self.loop.start()

    def execute(self, requests):
        # Decoupled: queue every request and return at once; the engine thread responds.
        for request in requests:
            sink = ResponseSink(request)
            try:
                input_ids = torch.from_numpy(
                    pb_utils.get_input_tensor_by_name(request, spec.INPUT_IDS).as_numpy().copy())
                embeds = pb_utils.get_input_tensor_by_name(request, self.image_input)
                # In the wire dtype (FP32, or FP16 for half-precision models: spec.wire_dtype), kept as is
                # here; the engine checks it is finite and casts it to the model's dtype at prefill.
                image_embeds = None if embeds is None else torch.from_numpy(embeds.as_numpy().copy())
                params = SamplingParams.from_inputs(optional_inputs(pb_utils, request, spec.SAMPLING_INPUTS),
                                                    self.serving)
                sizes = pb_utils.get_input_tensor_by_name(request, spec.IMAGE_SIZES) if self.model_spec.anyres else None
                keys = pb_utils.get_input_tensor_by_name(request, spec.IMAGE_KEYS)
                cached = pb_utils.get_input_tensor_by_name(request, spec.IMAGE_CACHED)
                frames = pb_utils.get_input_tensor_by_name(request, spec.VIDEO_FRAMES) if self.model_spec.videos \
                    else None
                self.engine.submit(input_ids.reshape(-1), image_embeds, params, sink,
                                   None if sizes is None else sizes.as_numpy(),
                                   None if keys is None else keys.as_numpy(),
                                   None if cached is None else cached.as_numpy(),
                                   cache_salt(pb_utils.get_input_tensor_by_name(request, spec.IN_CACHE_SALT)),
                                   None if frames is None else frames.as_numpy())
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
                sink.fail(triton_error(pb_utils, exc))
        return None

    def finalize(self):
        self.stop.set()
        self.loop.join(timeout=10)
        self.engine.abort_all("the server is shutting down")
        self.outbox.close()
        if self.embedding_cache is not None:
            self.embedding_cache.close()  # closes the directory too
        elif self.directory is not None:
            self.directory.close()
