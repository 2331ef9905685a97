"""LLaVA's vision side as PyTorch modules: the CLIP vision tower with feature selection, and the projector.

Two modules, one tensor contract (the `*_shape` functions give one image's shapes from the spec),
served as two Triton models (`vision_encoder`, `projector`):

    pixel_values   (B, 3, image_size, image_size)
    image_features (B, num_image_tokens, vision_hidden_size)
    image_embeds   (B, num_image_tokens, text_hidden_size)

each in `spec.wire_dtype` between the models (FP32, or FP16 when they compute in half precision).

`VisionEncoder` equals transformers' `LlavaModel.get_image_features` up to the projector: the
hidden state at `vision_feature_layer` (an index into `hidden_states`, 0 = embeddings), with CLS
dropped for the "default" strategy. Only the layers up to that index are built and loaded, so the
usual -2 skips the tower's last layer instead of computing and discarding it.

Around these modules: export/vision_weights.py loads them from a Hugging Face checkpoint,
llava_triton.vision_artifacts saves and loads their served weights, and
llava_triton.vision_serving prepares them as their Triton instances run them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.activations import ACT2FN

from .fp8 import concat_linears, quantize_linears
from .spec import ModelSpec


def num_layers_needed(vision_feature_layer: int, num_hidden_layers: int) -> int:
    """Encoder layers to run so that the last one's output is `hidden_states[vision_feature_layer]`."""
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise ValueError(f"only a single integer vision_feature_layer is supported, got {vision_feature_layer!r}")
    # hidden_states holds num_hidden_layers + 1 entries: the embeddings, then each layer's output.
    needed = vision_feature_layer if vision_feature_layer >= 0 else num_hidden_layers + 1 + vision_feature_layer
    if not 0 <= needed <= num_hidden_layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} is out of range for a vision tower "
                         f"with {num_hidden_layers} layers")
    return needed


class VisionEncoder(nn.Module):
    """CLIP vision tower cut at `vision_feature_layer`, then the select strategy (CLS dropped for "default")."""

    def __init__(self, vision_config: CLIPVisionConfig, vision_feature_layer: int = -2,
                 vision_feature_select_strategy: str = "default"):
        super().__init__()
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {vision_feature_select_strategy!r}")
        self.vision_config = vision_config  # the checkpoint's, with all its layers (saved as is)
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        tower_config = copy.deepcopy(vision_config)
        tower_config.num_hidden_layers = num_layers_needed(vision_feature_layer, vision_config.num_hidden_layers)
        tower_config._attn_implementation = "sdpa"
        self.vision_tower = CLIPVisionModel(tower_config)
        self.encoder_layer = encoder_layer  # compile_layers() replaces it with a compiled version
        self.eval()

    @property
    def num_image_tokens(self) -> int:
        num_patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    def module_config(self) -> dict[str, Any]:
        return {"vision_config": self.vision_config.to_dict(), "vision_feature_layer": self.vision_feature_layer,
                "vision_feature_select_strategy": self.vision_feature_select_strategy}

    @classmethod
    def from_module_config(cls, config: dict[str, Any]) -> VisionEncoder:
        return cls(CLIPVisionConfig.from_dict(config["vision_config"]), config["vision_feature_layer"],
                   config["vision_feature_select_strategy"])

    def fuse(self) -> None:
        """One GEMM for each layer's q, k and v instead of three (the same rows and biases,
        concatenated), as the served encoder runs them; the same products up to the GEMM library's
        blocking."""
        for layer in self.vision_tower.encoder.layers:
            attention = layer.self_attn
            attention.qkv_proj = concat_linears(attention.q_proj, attention.k_proj, attention.v_proj)
            del attention.q_proj, attention.k_proj, attention.v_proj

    def quantize_fp8(self) -> None:
        """Each layer's projections (q/k/v, out, fc1, fc2: 91 % of the FLOPs) in FP8 with per-output-
        channel scales (llava_triton.fp8); the patch embedding and the norms stay in the model's
        dtype. After any dtype change (Module.to would convert the FP8 buffers)."""
        for layer in self.vision_tower.encoder.layers:
            quantize_linears(layer.self_attn, ("qkv_proj", "q_proj", "k_proj", "v_proj", "out_proj"))
            quantize_linears(layer.mlp, ("fc1", "fc2"))

    def compile_layers(self) -> None:
        """torch.compile one encoder layer function (dynamic shapes, so every batch bucket shares it)
        that serves all the layers: layer norms, bias adds, the activation and the residuals fuse
        into few kernels around the GEMMs and attention. It compiles on its first call; make that
        before capturing CUDA graphs."""
        self.encoder_layer = torch.compile(encoder_layer, dynamic=True, fullgraph=True)

    def uncompile_layers(self) -> None:
        self.encoder_layer = encoder_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # CLIPVisionModel.forward's steps, minus the pooled output (post_layernorm of CLS) LLaVA
        # does not use. The tower is cut at the selected layer, so its last hidden state is the
        # selected one.
        tower = self.vision_tower
        hidden_states = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1 + num_patches, D)
        for layer in tower.encoder.layers:
            hidden_states = self.encoder_layer(layer, hidden_states)
        if self.vision_feature_select_strategy == "default":
            hidden_states = hidden_states[:, 1:]  # (B, num_patches, D): drop CLS
        return hidden_states


def encoder_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """One CLIP encoder layer (transformers' CLIPEncoderLayer in eval mode, no mask: pre-norm
    attention and quick-GELU MLP, each with a residual), a free function so that one compiled
    version serves every layer. q, k and v come from one GEMM once `VisionEncoder.fuse` ran."""
    attention, mlp = layer.self_attn, layer.mlp
    B, T, D = hidden_states.shape
    x = layer.layer_norm1(hidden_states)
    qkv_proj = getattr(attention, "qkv_proj", None)
    if qkv_proj is not None:
        q, k, v = qkv_proj(x).chunk(3, dim=-1)  # (B, T, D) each
    else:
        q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
    q, k, v = (t.view(B, T, attention.num_heads, attention.head_dim).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)  # (B, nh, T, hs); every patch sees all
    hidden_states = hidden_states + attention.out_proj(y.transpose(1, 2).reshape(B, T, D))
    return hidden_states + mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layer_norm2(hidden_states))))


class Projector(nn.Module):
    """LLaVA's 2-layer MLP; the same weight names as transformers' `LlavaMultiModalProjector`."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, projector_hidden_act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.vision_hidden_size = vision_hidden_size
        self.text_hidden_size = text_hidden_size
        self.projector_hidden_act = projector_hidden_act
        self.bias = bias
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)
        self.act = ACT2FN[projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size, bias=bias)
        self.eval()

    def module_config(self) -> dict[str, Any]:
        return {"vision_hidden_size": self.vision_hidden_size, "text_hidden_size": self.text_hidden_size,
                "projector_hidden_act": self.projector_hidden_act, "bias": self.bias}

    @classmethod
    def from_module_config(cls, config: dict[str, Any]) -> Projector:
        return cls(**config)

    def quantize_fp8(self) -> None:
        """Both linears in FP8 with per-output-channel scales (llava_triton.fp8), after any dtype change."""
        quantize_linears(self, ("linear_1", "linear_2"))

    def compile_layers(self) -> None:
        """torch.compile the forward (dynamic shapes): the bias add and activation fuse into one kernel."""
        self.forward = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def uncompile_layers(self) -> None:
        self.__dict__.pop("forward", None)  # the class's forward again

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self._forward(image_features)

    def _forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


def pixel_values_shape(model: ModelSpec) -> tuple[int, int, int]:
    """One image's `pixel_values` shape, batch axis excluded."""
    return (model.num_channels, model.image_size, model.image_size)


def image_features_shape(model: ModelSpec) -> tuple[int, int]:
    """One image's `image_features` shape, batch axis excluded."""
    return (model.num_image_tokens, model.vision_hidden_size)


def image_embeds_shape(model: ModelSpec) -> tuple[int, int]:
    """One image's `image_embeds` shape, batch axis excluded."""
    return (model.num_image_tokens, model.text_hidden_size)
