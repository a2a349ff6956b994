"""Refit plumbing: bucketing by bytes, bucket transports, and the version-based skip with its wake order."""

import pytest
import torch

from megatron_s2l.rollout.refit import Refitter, decode_bucket, encode_bucket, iter_buckets


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


class RecordingEngine:
    def __init__(self):
        self.events = []

    def wake(self, tags=None):
        self.events.append(("wake", tuple(tags)))

    def update_weights(self, named_tensors, *, version=None):
        items = list(named_tensors)
        self.events.append(("update", version, [n for n, _ in items]))
        return {"bytes": float(sum(t.numel() * 4 for _, t in items)), "buckets": 1.0}


def test_refit_only_when_the_version_moves_and_wakes_weights_first():
    engine = RecordingEngine()
    refitter = Refitter(engine)
    exported = []

    def export():
        exported.append(1)
        yield from named(4, 4)

    stats = refitter.refit(export(), version=3)
    assert engine.events == [("wake", ("weights",)), ("update", 3, ["w0", "w1"]), ("wake", ("kv_cache",))]
    assert stats["bytes"] == 32 and stats["mb_per_s"] > 0
    assert refitter.refit(export(), version=3) is None and exported == [1]  # the skipped export never ran
    refitter.refit(export(), version=4)
    assert exported == [1, 1] and engine.events[-2][1] == 4
