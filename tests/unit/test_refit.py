"""Refit plumbing: bucketing by bytes and bucket transports (when to refit: tests/unit/test_colocation.py)."""

import pytest
import torch

from megatron_s2l.rollout.refit import decode_bucket, encode_bucket, iter_buckets


def named(*sizes):
    return [(f"w{i}", torch.arange(n, dtype=torch.float32)) for i, n in enumerate(sizes)]  # 4 bytes each


def test_buckets_hold_at_most_the_budget_in_order():
    buckets = list(iter_buckets(named(3, 2, 4, 10, 1), bucket_bytes=24))  # 12, 8, 16, 40, 4 bytes
    assert [[name for name, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4"]]
    assert list(iter_buckets([], 8)) == []
    with pytest.raises(ValueError, match="refit_bucket_bytes"):
        list(iter_buckets(named(1), 0))


def test_buckets_consume_the_input_lazily():
    pulled = []

    def source():
        for item in named(2, 2, 2):
            pulled.append(item[0])
            yield item

    first = next(iter_buckets(source(), bucket_bytes=16))
    assert [n for n, _ in first] == ["w0", "w1"] and pulled == ["w0", "w1", "w2"]


@pytest.mark.parametrize("transport", ["direct", "bytes"])
def test_transports_round_trip(transport):
    bucket = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.randn(5).to(torch.bfloat16)),
              ("c", torch.randn(4, 6)[:, ::2])]  # non-contiguous
    decoded = dict(decode_bucket(encode_bucket(bucket, transport), torch.device("cpu")))
    assert sorted(decoded) == sorted(name for name, _ in bucket)
    for name, tensor in bucket:
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor)
    with pytest.raises(ValueError, match="accepted values"):
        encode_bucket(bucket, "pigeon")
