"""The bucketing that every CUDA-graph runner (decode, prefill, vision) shares; capture itself needs a GPU
(tests/test_gpu.py)."""

from llava_triton.cuda_graphs import batch_buckets, bucket


def test_batch_buckets_are_powers_of_two_up_to_the_maximum():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(111) == [1, 2, 4, 8, 16, 32, 64, 111]


def test_bucket_is_the_smallest_that_holds_the_value():
    buckets = [1, 2, 4, 8]
    assert [bucket(n, buckets) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert bucket(9, buckets) is None
