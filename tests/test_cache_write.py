"""Prefill's cache write as a Triton kernel (llava_triton/cache_write.py; Triton's interpreter on the
CPU, see conftest.py; compiled on a GPU) against the index_put it replaces, bit for bit, and the
model's prefill on a GPU through it."""

import pytest
import torch

from llava_triton import cache_write

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(not cache_write.available(), reason="the triton package is not installed"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # the interpreter
]


def index_put(pool: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, new: torch.Tensor) -> None:
    if pool.element_size() == 1:
        pool, new = pool.view(torch.uint8), new.view(torch.uint8)
    pool[blocks, :, offsets] = new


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_heads", [4, 3])  # 3: not a power of two, the tile's extra rows masked
def test_kernel_writes_what_index_put_writes(dtype, num_heads):
    generator = torch.Generator().manual_seed(0)
    num_blocks, block_size, head_dim, tokens = 9, 4, 16, 13
    pool_shape = (num_blocks, num_heads, block_size, head_dim)
    # Positions scattered over the pool, as block tables give them: no two tokens at one position.
    flat = torch.randperm(num_blocks * block_size, generator=generator)[:tokens]
    blocks, offsets = (flat // block_size).to(DEVICE), (flat % block_size).to(DEVICE)
    # As prefill hands them over, each with its own strides: keys (1, nkv, N, hs) transposed to
    # (N, nkv, hs), values a slice of a fused projection's (N, 3 * nkv * hs) output.
    k = torch.randn(1, num_heads, tokens, head_dim, generator=generator).to(DEVICE, dtype)[0].transpose(0, 1)
    fused = torch.randn(tokens, 3 * num_heads * head_dim, generator=generator).to(DEVICE, dtype)
    v = fused[:, num_heads * head_dim: 2 * num_heads * head_dim].view(tokens, num_heads, head_dim)
    assert not k.is_contiguous() and not v.is_contiguous() and k.stride() != v.stride()
    pools = [torch.randn(pool_shape, generator=generator).to(DEVICE, dtype) for _ in range(2)]
    expected = [pool.clone() for pool in pools]
    cache_write.write(*pools, blocks, offsets, k, v)
    index_put(expected[0], blocks, offsets, k)
    index_put(expected[1], blocks, offsets, v)
    for got, want in zip(pools, expected):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_kernel_refuses_what_it_cannot_copy():
    pool = torch.zeros(4, 2, 4, 16, device=DEVICE)
    at = torch.zeros(3, dtype=torch.long, device=DEVICE)
    new = torch.zeros(3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="cannot write keys"):
        cache_write.write(pool, pool, at, at, new.bfloat16(), new.bfloat16())  # another dtype than the pool's
    with pytest.raises(ValueError, match="cannot write keys"):
        wide = torch.zeros(3, 4, 16, device=DEVICE)  # more heads than the pool's
        cache_write.write(pool, pool, at, at, wide, wide)
    with pytest.raises(ValueError, match="cannot write keys"):
        cache_write.write(pool, pool, at[:2], at[:2], new, new)


@pytest.mark.skipif(DEVICE != "cuda", reason="the model writes through the kernel on a GPU only")
@pytest.mark.parametrize("kv_cache_dtype", [None, torch.float8_e4m3fn])
def test_prefill_through_the_kernel_fills_the_cache_as_index_put_does(monkeypatch, kv_cache_dtype):
    from test_llama import CONFIG, setup_blocks

    from llava_triton.llama import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(DEVICE).eval()
    embeds = torch.randn(1, 50, CONFIG.hidden_size, device=DEVICE)
    caches = []
    for available in (True, False):
        monkeypatch.setattr(cache_write, "available", lambda available=available: available)
        setup_blocks(model, rows=2, seq_len=64, kv_cache_dtype=kv_cache_dtype)
        model.prefill(embeds, [(0, 0, 20), (1, 0, 30)])
        caches.append([(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone())
                       for layer in model.model.layers])
    for (k_kernel, v_kernel), (k_put, v_put) in zip(*caches):
        assert k_kernel.view(torch.uint8).any()  # something was written
        assert torch.equal(k_kernel.view(torch.uint8), k_put.view(torch.uint8))
        assert torch.equal(v_kernel.view(torch.uint8), v_put.view(torch.uint8))
