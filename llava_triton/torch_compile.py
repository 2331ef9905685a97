"""torch.compile of the served models' layers: compiled by warm-up calls before any CUDA graph capture,
eager layers where compiling fails (the language model's `compile_model`, the vision modules' `maybe_compiled`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .llama import LlamaForCausalLM
    from .vision import Projector, VisionEncoder

log = logging.getLogger(__name__)


def compile_or_eager(module: Any, what: str, warm_up: Callable[[], Any]) -> bool:
    """`module.compile_layers()`, then `warm_up()` (in inference mode) to make the calls that compile
    them, before any CUDA graph capture. If that fails, `module.uncompile_layers()`: eager layers are
    slower but correct, so serve rather than fail to load. Returns whether compiled layers are used."""
    started = time.monotonic()
    module.compile_layers()
    try:
        with torch.inference_mode():
            warm_up()
    except Exception:  # noqa: BLE001
        log.exception("torch.compile of %s failed; running it eagerly", what)
        module.uncompile_layers()
        return False
    log.info("compiled %s in %.1f s", what, time.monotonic() - started)
    return True


def compile_model(model: LlamaForCausalLM) -> bool:
    """Compile the model's layers (LlamaForCausalLM.compile_layers) and make the calls that compile them,
    before any CUDA graph capture; eager layers if that fails. Returns whether compiled layers
    are used. The model's caches must be set up (LlamaForCausalLM.setup_caches)."""
    device = model.lm_head.weight.device

    def warm_up() -> None:
        # Dummy tokens through block-table rows that no request holds yet: all null blocks, so the
        # keys and values land in the null block. Odd sizes: a size equal to one of the model's
        # (head_dim...) would be compiled as a constant.
        embeds = torch.zeros(1, 13, model.config.hidden_size, device=device, dtype=model.lm_head.weight.dtype)
        model.prefill(embeds, [(0, 0, 6), (min(1, model.max_seqs - 1), 0, 7)])
        # Batch 1 is compiled apart from the dynamic-shape version the other batches share.
        length = max(model.max_seq_len // 2, 1)
        for batch in sorted({1, min(2, model.max_seqs)}):
            positions = torch.full((batch,), length - 1, device=device)
            rows = torch.full((batch,), model.padding_row, device=device)
            model.decode(torch.zeros_like(positions), positions, rows, length)

    return compile_or_eager(model, "the language model", warm_up)


def maybe_compiled(module: VisionEncoder | Projector, item_shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device, enabled: bool) -> None:
    """`module.compile_layers()` on a GPU when enabled, compiled here by calls at batch 1 and 3 (batch 1
    is specialised, 3 gives the dynamic-batch version every other bucket shares); eager layers if
    compilation fails (`compile_or_eager`). Call before capturing CUDA graphs."""
    if not enabled or device.type != "cuda":
        return

    def warm_up() -> None:
        for batch in (1, 3):
            module(torch.zeros((batch, *item_shape), dtype=dtype, device=device))

    compile_or_eager(module, type(module).__name__, warm_up)
