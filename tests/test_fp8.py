"""FP8 weights (llava_triton/fp8.py): the quantisation, each matmul path against the dequantised
weights, and a model served with them. The GEMV kernel (llava_triton/gemv.py) runs in Triton's interpreter on the CPU
(see conftest.py) and compiled on a GPU; cuBLASLt's FP8 GEMM only on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from test_llama import CONFIG, setup_blocks
from torch import nn

from llava_triton import fp8, gemv
from llava_triton.llama import LlamaForCausalLM
from llava_triton.spec import ServingConfig
from llava_triton.torch_compile import compile_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not gemv.available(), reason="the triton package is not installed")


def dequantized(layer: fp8.Fp8Linear) -> torch.Tensor:
    return layer.weight.float() * layer.weight_scale[:, None]


def test_rows_keep_three_mantissa_bits_and_their_largest_value():
    torch.manual_seed(0)
    weight = torch.randn(64, 300) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    weight[5] = 0.0
    quantized, scale = fp8.quantize_rows(weight)
    assert quantized.dtype == fp8.FP8 and scale.shape == (64,) and scale[5] == 1.0
    restored = quantized.float() * scale[:, None]
    # e4m3 rounds to within 2^-4 of a value (relative), subnormals to within 2^-10 of the row's scale.
    bound = weight.abs() * 2**-4 + scale[:, None] * 2**-10
    assert bool(((restored - weight).abs() <= bound).all())
    torch.testing.assert_close(restored.abs().amax(dim=1), weight.abs().amax(dim=1))  # the largest maps to 448
    assert not restored[5].any()


def test_linear_on_the_cpu_multiplies_by_the_dequantised_weights_and_keeps_no_full_copy():
    torch.manual_seed(1)
    linear = nn.Linear(96, 40, bias=False)
    layer = fp8.Fp8Linear(linear)
    # Only FP8 weights and their scales: the model-dtype matrix is not kept (that is the memory saved).
    assert ({name: t.dtype for name, t in layer.state_dict().items()}
            == {"weight": fp8.FP8, "weight_scale": torch.float32})
    assert not list(layer.parameters())
    for shape in ((2, 3, 96), (1, 300, 96)):  # decode-sized and prefill-sized row counts alike
        x = torch.randn(shape)
        got = layer(x)
        assert got.shape == (*shape[:-1], 40)
        torch.testing.assert_close(got, F.linear(x, dequantized(layer)), rtol=0, atol=0)
        reference = linear(x)
        assert (got - reference).norm() / reference.norm() < 0.05  # and near the original


def test_linear_with_a_bias_adds_it_after_the_product():
    torch.manual_seed(4)
    linear = nn.Linear(64, 48)  # CLIP's and the projector's linears have biases
    layer = fp8.Fp8Linear(linear)
    assert {name: t.dtype for name, t in layer.state_dict().items()} == {
        "weight": fp8.FP8, "weight_scale": torch.float32, "bias": torch.float32}
    torch.testing.assert_close(layer.bias, linear.bias.detach(), rtol=0, atol=0)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized(layer), linear.bias.detach()))


@needs_triton
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_kernel_equals_the_dequantised_product(dtype):
    torch.manual_seed(2)
    # Sizes that are not multiples of the kernel's blocks (4 rows, 512 columns).
    layer = fp8.Fp8Linear(nn.Linear(700, 37, bias=False)).to(DEVICE)
    x = torch.randn(1, 700, device=DEVICE).to(dtype)
    got = fp8.fp8_gemv(x, layer.weight, layer.weight_scale)
    assert got.shape == (1, 37) and got.dtype == dtype
    expected = x.float() @ dequantized(layer).t()
    torch.testing.assert_close(got.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's FP8 GEMM needs a GPU")
def test_scaled_mm_path_stays_close_to_the_dequantised_product():
    torch.manual_seed(3)
    # A bias too, in bfloat16 as the served vision models' are. (Quantise after any dtype change:
    # Module.to(dtype) would convert the FP8 buffers, which are floating point.)
    layer = fp8.Fp8Linear(nn.Linear(512, 256).to("cuda", torch.bfloat16))
    for rows in (37, 700):  # a decode batch, a prefill: activations rounded to FP8 per row too
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        x[:, :3] *= 30  # outlier channels, as Llama's activations have: per-row scales absorb them
        got = layer(x)
        expected = x.float() @ dequantized(layer).t() + layer.bias.float()
        error = (got.float() - expected).norm() / expected.norm()
        assert 0 < error < 0.05, (rows, error)  # about 0.025 on the H100
    torch.testing.assert_close(layer(x[:1]).float(), expected[:1], rtol=1e-2, atol=1e-2)  # one row: the GEMV


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_quantized_model_stays_close_to_the_full_one(compiled):
    torch.manual_seed(0)
    full = LlamaForCausalLM(CONFIG).eval().to(DEVICE)
    torch.manual_seed(0)
    quantized = LlamaForCausalLM(CONFIG).eval().to(DEVICE)
    results = []
    for model, quantize in ((full, False), (quantized, True)):
        setup_blocks(model)
        model.fuse()
        if quantize:
            model.quantize_fp8()
            attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
            assert all(isinstance(m, fp8.Fp8Linear) for m in (attention.qkv_proj, attention.o_proj,
                                                                mlp.gate_up_proj, mlp.down_proj))
            assert model.lm_head.weight.dtype == torch.float32
            if compiled:
                assert compile_model(model)
        torch.manual_seed(5)
        x = torch.randn(1, 11, CONFIG.hidden_size, device=DEVICE)
        logits = [model.prefill(x, [(0, 0, 5), (1, 0, 6)])]
        for step in range(3):
            ids = torch.tensor([3, 9], device=DEVICE) + step
            rows = torch.tensor([0, 1], device=DEVICE)
            logits.append(model.decode(ids, torch.tensor([5, 6], device=DEVICE) + step, rows, 16))
            logits.append(model.decode(ids[:1], torch.tensor([5], device=DEVICE) + step, rows[:1], 16))  # batch 1
        results.append(logits)
    for got, expected in zip(results[1], results[0]):
        assert not torch.equal(got, expected)
        error = (got - expected).norm() / expected.norm()
        assert error < 0.03, error  # about 0.01 on this model


def test_weight_dtype_setting():
    assert ServingConfig(lm_weight_dtype="fp8_e4m3").lm_weight_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="lm_weight_dtype must be auto or fp8_e4m3"):
        ServingConfig(lm_weight_dtype="int4")
    # A repository exported before the rename says what to use instead.
    with pytest.raises(ValueError, match=r"decode_weight_dtype is now lm_weight_dtype"):
        ServingConfig.from_dict({"decode_weight_dtype": "fp8_e4m3"})
    from export.__main__ import parse_set  # and so does the export's --set

    with pytest.raises(SystemExit, match=r"decode_weight_dtype is now lm_weight_dtype"):
        parse_set(["decode_weight_dtype=fp8_e4m3"])
    assert parse_set(["lm_weight_dtype=fp8_e4m3"]) == {"lm_weight_dtype": "fp8_e4m3"}
