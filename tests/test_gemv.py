"""The batch-1 GEMV (llava_triton/gemv.py) over weights in the activations' dtype: the kernel (in
Triton's interpreter on the CPU, see conftest.py; compiled on a GPU), GemvLinear, the model's
use_gemv and the decode_gemv setting. Its FP8 use is tests/test_fp8.py's; compiled and replayed
from CUDA graphs inside a decode step, tests/test_gpu.py's."""

import pytest
import torch
import torch.nn.functional as F
from test_llama import CONFIG
from torch import nn

from llava_triton import fp8, gemv
from llava_triton.llama import LlamaForCausalLM
from llava_triton.lm_runtime import use_gemv
from llava_triton.spec import ServingConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not gemv.available(), reason="the triton package is not installed")


@needs_triton
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter
@pytest.mark.parametrize("tiling", [None, gemv.Tiling(block_n=16, block_k=256, num_warps=4, num_stages=2),
                                    gemv.Tiling(block_n=1, block_k=64, num_warps=1, num_stages=1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_product(dtype, tiling):
    """Sizes that are not multiples of any tile (37 rows, 700 columns); the weight's dtype's tiling
    (TILINGS) and others."""
    torch.manual_seed(3)
    weight = torch.randn(37, 700, device=DEVICE).to(dtype)
    x = torch.randn(1, 700, device=DEVICE).to(dtype)
    got = gemv.gemv(x, weight, tiling=tiling)
    assert got.shape == (1, 37) and got.dtype == dtype
    expected = x.float() @ weight.float().t()
    torch.testing.assert_close(got.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


@needs_triton
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_the_op_is_the_kernel():
    torch.manual_seed(4)
    weight, x = torch.randn(9, 40, device=DEVICE), torch.randn(1, 40, device=DEVICE)
    assert torch.equal(gemv.gemv_op(x, weight), gemv.gemv(x, weight))


def test_linear_keeps_the_weights_and_multiplies_as_linear_off_the_gpu():
    torch.manual_seed(5)
    linear = nn.Linear(24, 10, bias=True)
    layer = gemv.GemvLinear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert dict(layer.named_parameters()).keys() == {"weight", "bias"}
    for shape in [(1, 24), (1, 1, 24), (3, 24)]:
        x = torch.randn(shape)
        assert torch.equal(layer(x), F.linear(x, linear.weight, linear.bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel serves one row on a GPU only")
def test_linear_runs_one_row_through_the_kernel_on_the_gpu():
    torch.manual_seed(6)
    linear = nn.Linear(256, 48, bias=True).cuda().to(torch.bfloat16)
    layer = gemv.GemvLinear(linear)
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    expected = gemv.gemv(x.reshape(1, -1), linear.weight).reshape(1, 1, 48) + linear.bias
    assert torch.equal(layer(x), expected)
    torch.testing.assert_close(layer(x), linear(x), rtol=2e-2, atol=2e-2)


def test_model_swaps_its_model_dtype_projections_and_lm_head_only():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    model.fuse()
    model.model.layers[1].mlp.gate_up_proj = fp8.Fp8Linear(model.model.layers[1].mlp.gate_up_proj)
    weights = {name: p for name, p in model.named_parameters()}
    model.use_gemv()
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert all(isinstance(m, gemv.GemvLinear) for m in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj,
                                                        mlp.down_proj, model.lm_head))
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, fp8.Fp8Linear)  # FP8 runs its own rows
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    after = dict(model.named_parameters())
    assert after.keys() == weights.keys() and all(after[name] is p for name, p in weights.items())


def test_decode_gemv_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_gemv(ServingConfig(), cpu)
    assert not use_gemv(ServingConfig(decode_gemv="triton"), cpu)  # on the CPU every product is F.linear's
    assert use_gemv(ServingConfig(), cuda) == gemv.available()
    assert not use_gemv(ServingConfig(decode_gemv="cublas"), cuda)
    with pytest.raises(ValueError, match="decode_gemv must be auto, triton or cublas"):
        ServingConfig(decode_gemv="cutlass")


def test_triton_gemv_without_triton_is_refused(monkeypatch):
    monkeypatch.setattr(gemv, "triton", None)
    with pytest.raises(RuntimeError, match="decode_gemv is 'triton' but the triton package is not installed"):
        use_gemv(ServingConfig(decode_gemv="triton"), torch.device("cuda"))
