import numpy as np
import pytest
import torch

from llava_triton.host_tensors import all_finite, upload


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_finds_every_nan_and_infinity_and_passes_every_finite_value(dtype):
    info = np.finfo(dtype)
    finite = np.array([0.0, -0.0, 1.5, -2.25, info.max, -info.max, info.tiny, -info.tiny, info.smallest_subnormal,
                       -info.smallest_subnormal], dtype=dtype)
    assert all_finite(finite) and all_finite(np.zeros((0, 3), dtype))
    for bad in (np.nan, -np.nan, np.inf, -np.inf):
        for index in (0, 5, len(finite) - 1):
            array = finite.copy()
            array[index] = bad
            assert not all_finite(array)
    # Every NaN bit pattern, not only numpy's own: any mantissa under an all-ones exponent.
    unsigned = np.uint16 if dtype == np.float16 else np.uint32
    exponent = 0x7C00 if dtype == np.float16 else 0x7F800000
    for mantissa in (1, 2, exponent // 2 - 1 & ~exponent):
        for sign in (0, 0x8000 if dtype == np.float16 else 0x80000000):
            array = finite.copy()
            array.view(unsigned)[3] = sign | exponent | mantissa
            assert not all_finite(array)
    # A non-contiguous view is read as its values.
    grid = np.ones((4, 4), dtype)
    grid[1, 1] = np.nan
    assert all_finite(grid[::2, ::2]) and not all_finite(grid[1:, 1:])


def test_all_finite_matches_numpy_on_random_bits():
    bits = np.random.default_rng(0).integers(0, 2**16, size=(2000, 64), dtype=np.uint16)
    for row in bits:
        values = row.view(np.float16)
        assert all_finite(values) == bool(np.isfinite(values).all())


def test_all_finite_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float16 or float32 arrays, got int64"):
        all_finite(np.zeros(3, np.int64))


def test_upload_to_the_cpu_is_the_tensor_itself():
    tensor = torch.arange(6).reshape(2, 3)
    assert torch.equal(upload(tensor, torch.device("cpu")), tensor)
