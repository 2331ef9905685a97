"""The Triton decode-attention kernel (run by Triton's interpreter on the CPU, see conftest.py)
against PyTorch's SDPA on the same cached values read through block tables, and the FP8 KV cache
around it."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_llama import CONFIG, setup_blocks

from llava_triton import decode_attention as da
from llava_triton.kv_blocks import blocks_needed
from llava_triton.llama import LlamaForCausalLM, gather_blocks, to_cache_dtype
from llava_triton.lm_runtime import use_decode_kernel
from llava_triton.spec import ServingConfig
from llava_triton.torch_compile import compile_model

pytestmark = [
    pytest.mark.skipif(not da.available(), reason="the triton package is not installed"),
    # Triton's interpreter converts 1-element arrays to scalars the way NumPy 1.25 deprecated.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
FP8 = torch.float8_e4m3fn
# The kernel tests run compiled on a GPU where there is one (tests/test_gpu.py's machine).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_cache, v_cache, tables, lengths):
    """SDPA in float32 over each row's first lengths[b] positions, gathered through its block table
    (the cache's values as stored)."""
    num_heads = q.shape[1]
    keys, values = gather_blocks(k_cache, tables).float(), gather_blocks(v_cache, tables).float()
    mask = (torch.arange(keys.shape[2], device=q.device)[None] < lengths[:, None])[:, None, None]  # (B, 1, 1, L)
    return F.scaled_dot_product_attention(q.float()[:, :, None], keys, values, attn_mask=mask,
                                          enable_gqa=num_heads != k_cache.shape[1])[:, :, 0]


def block_pool(rows: int, max_len: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, seed: int = 0):
    """Random keys and values in a pool with one spare block (never in a table), and tables that
    scatter each row's blocks over it."""
    generator = torch.Generator().manual_seed(seed)
    per_row = blocks_needed(max_len, block_size)
    shape = (rows * per_row + 1, num_kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    tables = torch.randperm(rows * per_row, generator=generator).reshape(rows, per_row).to(DEVICE, torch.int32)
    return k_cache, v_cache, tables


@pytest.mark.parametrize("cache_dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (FP8, 2e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads,splits,block_size", [(4, 4, 1, 16), (4, 2, 3, 5), (8, 1, 5, 64)])
@pytest.mark.parametrize("tile,deferred", [(None, False), (64, False), (16, True)])
def test_kernel_equals_sdpa(cache_dtype, atol, num_heads, num_kv_heads, splits, block_size, tile, deferred):
    """Cache blocks smaller than the kernel's tile of positions (16, and 5: not a divisor of it),
    as large and larger (64); the dtype's tile (TILINGS: 16 positions in float32, 32 in bfloat16 and
    FP8), one of 64, and lanes that each keep their softmax state (Tiling.deferred)."""
    torch.manual_seed(0)
    max_len, head_dim = 200, 32
    q_dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    q = torch.randn(4, num_heads, head_dim, dtype=q_dtype, device=DEVICE)
    # Rows: the whole table, one token, a length that ends inside a tile, and one shorter than the
    # later splits' starts (their ranges are empty).
    k_cache, v_cache, tables = block_pool(4, max_len, block_size, num_kv_heads, head_dim, cache_dtype)
    lengths = torch.tensor([max_len, 1, 77, 5], device=DEVICE)
    tiling = tile and da.Tiling(block=tile, num_warps=2, num_stages=1, programs_per_sm=4, deferred=deferred)
    got = da.decode_attention(q, k_cache, v_cache, tables, lengths, splits, tiling)
    assert got.dtype == q_dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), reference(q, k_cache, v_cache, tables, lengths), rtol=0, atol=atol)


@pytest.mark.parametrize("deferred", [False, True])
def test_kernel_reads_nothing_past_a_rows_length_nor_outside_its_blocks(deferred):
    torch.manual_seed(1)
    q = torch.randn(2, 2, 16, device=DEVICE)
    k_cache, v_cache, tables = block_pool(2, 128, 16, 2, 16, torch.float32, seed=1)
    tables = tables[:, :6].contiguous()  # 96 positions a row; the pool's other blocks are no row's
    lengths = torch.tensor([70, 3], device=DEVICE)
    tiling = da.Tiling(block=16, num_warps=2, num_stages=1, programs_per_sm=4, deferred=deferred)
    expected = da.decode_attention(q, k_cache, v_cache, tables, lengths, 2, tiling)
    read = torch.zeros(k_cache.shape[0], 16, dtype=torch.bool, device=DEVICE)  # (block, offset) each row reads
    for row, length in enumerate(lengths.tolist()):
        positions = torch.arange(length, device=DEVICE)
        read[tables[row].long()[positions // 16], positions % 16] = True
    for cache in (k_cache, v_cache):
        cache.transpose(1, 2)[~read] = float("nan")  # (block, offset, nkv, hs) indexed by (block, offset)
    assert k_cache.isnan().any()
    assert torch.equal(da.decode_attention(q, k_cache, v_cache, tables, lengths, 2, tiling), expected)


def test_kernel_refuses_tables_it_cannot_read():
    q = torch.randn(2, 2, 16, device=DEVICE)
    k_cache, v_cache, tables = block_pool(2, 32, 16, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        da.decode_attention(q, k_cache, v_cache, tables.long(), torch.tensor([3, 3], device=DEVICE), 1)
    with pytest.raises(ValueError, match=r"block_tables must be int32 \(2, nb\)"):
        da.decode_attention(q, k_cache, v_cache, tables[:1], torch.tensor([3, 3], device=DEVICE), 1)


def test_splits_fill_the_gpu_but_never_get_shorter_than_a_block():
    tiling = da.Tiling(block=64, num_warps=2, num_stages=1, programs_per_sm=4)
    assert da.num_splits(1, 32, 768, 132, tiling) == 768 // 64  # 12: capped by the length
    assert da.num_splits(1, 32, 4096, 132, tiling) == math.ceil(4 * 132 / 32)  # 17: the SMs' programs
    assert da.num_splits(8, 32, 768, 132, tiling) == 3
    assert da.num_splits(128, 32, 768, 132, tiling) == 1
    assert da.num_splits(4, 4, 10, 132, tiling) == 1
    assert da.num_splits(1, 32, 768, 132, da.TILINGS[2]) == 17  # bfloat16: 4 programs an SM
    assert da.num_splits(1, 32, 768, 132, da.TILINGS[1]) == 768 // 32  # FP8: 8 an SM, capped at 24 tiles of 32


def test_fp8_cache_saturates_instead_of_making_nan():
    cache = torch.zeros(3, dtype=FP8)
    got = to_cache_dtype(torch.tensor([1e4, -1e4, 0.5]), cache)
    assert got.dtype == FP8 and got.float().tolist() == [448.0, -448.0, 0.5]
    same = torch.ones(2)
    assert to_cache_dtype(same, torch.zeros(2)) is same


def make_model(kv_cache_dtype=None, decode_kernel=False, rows=4, seq_len=64, block_size=4):
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval().to(DEVICE)
    setup_blocks(model, rows, seq_len, block_size, kv_cache_dtype, decode_kernel)
    model.fuse()
    return model


def run_decodes(model, steps=4):
    """Prefill 3 sequences of different lengths, then `steps` decode steps → the logits of each."""
    torch.manual_seed(2)
    x = torch.randn(1, 5 + 9 + 2, CONFIG.hidden_size).to(DEVICE)
    logits = [model.prefill(x, [(3, 0, 5), (1, 0, 9), (0, 0, 2)])]
    positions = torch.tensor([5, 9, 2], device=DEVICE)
    rows = torch.tensor([3, 1, 0], device=DEVICE)
    for step in range(steps):
        ids = torch.tensor([7, 11, 13], device=DEVICE) + step
        logits.append(model.decode(ids, positions + step, rows, 64))
    return logits


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.usefixtures("fresh_dynamo")
def test_model_decodes_the_same_with_the_kernel(compiled):
    """The kernel as decode attention inside the model (an opaque op to torch.compile) gives
    what SDPA gives."""
    sdpa, kernel = make_model(), make_model(decode_kernel=True)
    if compiled:
        assert compile_model(kernel)
    for a, b in zip(run_decodes(kernel), run_decodes(sdpa)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decode_kernel", [False, True])
def test_fp8_cache_stays_close_to_the_full_precision_cache(decode_kernel):
    full, fp8 = make_model(), make_model(FP8, decode_kernel)
    assert fp8.model.layers[0].self_attn.cache.k.dtype == FP8
    got, expected = run_decodes(fp8), run_decodes(full)
    torch.testing.assert_close(got[0], expected[0])  # prefill attends to its fresh keys and values
    for a, b in zip(got[1:], expected[1:]):
        assert not torch.equal(a, b)  # decode read rounded keys and values...
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * float(b.abs().max()))  # ...close to the full ones


def test_decode_attention_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fp8 = ServingConfig(kv_cache_dtype="fp8_e4m3")
    assert not use_decode_kernel(fp8, cpu)  # auto: only on a GPU, for an FP8 cache and a bfloat16 one
    assert use_decode_kernel(fp8, cuda)
    assert use_decode_kernel(ServingConfig(), cuda)
    assert not use_decode_kernel(ServingConfig(decode_attention="sdpa"), cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's interpreter: the kernel may run on the CPU
    assert use_decode_kernel(ServingConfig(decode_attention="triton"), cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="Triton kernels need a GPU"):
        use_decode_kernel(ServingConfig(decode_attention="triton"), cpu)
    with pytest.raises(ValueError, match="decode_attention must be auto, triton or sdpa"):
        ServingConfig(decode_attention="flash")
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or fp8_e4m3"):
        ServingConfig(kv_cache_dtype="int8")
