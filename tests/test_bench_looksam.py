"""The throughput harness's LookSAM variants: an off step moves SGD's bytes, a look step one all-reduce more.

Counted by the DDP comm hook (``CommCounter``) at world size 2 with gloo, per timed step; the
numbers of a quick run mean nothing, the counts do.
"""

from __future__ import annotations

import pytest

from benchmarks.throughput import harness, report
from benchmarks.throughput.config import BenchConfig, parse_variant


def test_looksam_variant_names():
    cfg = BenchConfig(quick=True, steps=2)
    off, look, micro = (parse_variant(n, 8, 1, cfg) for n in ("looksam-off", "looksam-k3", "looksam-b/4-k2"))
    assert dict(off.options)["k"] > 10**6 and dict(off.options)["warmup"] == 0 and off.ascent == "local"
    assert dict(look.options)["k"] == 3 and look.m == 8
    assert micro.ascent == "micro" and micro.micro_batch_size == micro.m == 2 and dict(micro.options)["k"] == 2
    for bad in ("looksam-k0", "looksam-b/3-k2", "looksam-kx", "looksam-b/4"):
        with pytest.raises(ValueError, match="looksam-k<K>"):
            parse_variant(bad, 8, 1, cfg)


def test_off_step_floor_is_the_reuse_arithmetic_alone():
    """``sgd+reuse``'s extra work is LookSAM's off-step rule and nothing else (float64 reference)."""
    import torch

    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7)]
    before = [g.double().clone() for g in grads]
    g_v: list = []
    harness.reuse_floor_(grads, g_v, 0.3)
    v = [t.double() for t in g_v[:-1]]
    norm = lambda ts: torch.sqrt(sum((t * t).sum() for t in ts))  # noqa: E731
    assert all(a.shape == b.shape for a, b in zip(v, before))
    for g, b, d in zip(grads, before, v):
        torch.testing.assert_close(g.double(), b + 0.3 * norm(before) / norm(v) * d, rtol=1e-6, atol=1e-6)
    floor = parse_variant("sgd+reuse", 8, 1, BenchConfig(quick=True, steps=2))
    assert floor.optimizer is None and dict(floor.options) == {"reuse_alpha": 0.3}


@pytest.mark.slow
def test_looksam_steps_move_sgd_bytes_off_and_one_all_reduce_more_on_look_steps():
    cfg = BenchConfig(name="looksam_quick", model="small_cnn", image_size=16, num_classes=10, batch_size=8,
                      world_sizes=(2,), threads=1, warmup=1, steps=6, steps_per_round=1, quick=True, timeout_s=300,
                      variants=("sgd", "sgd+reuse", "looksam-off", "looksam-k2", "looksam-b/4-k3"))
    ranks = harness.run_world(cfg, 2)
    assert ranks[0]["skipped"] == {}
    sgd = set(ranks[0]["variants"]["sgd"]["bytes"])
    assert len(sgd) == 1 and sgd.pop() > 0
    sgd_bytes = ranks[0]["variants"]["sgd"]["bytes"][0]
    assert set(ranks[0]["variants"]["looksam-off"]["bytes"]) == {sgd_bytes}, "every off step: SGD's bytes"
    assert set(ranks[0]["variants"]["sgd+reuse"]["bytes"]) == {sgd_bytes}, "the floor: SGD's bytes"
    # warm-up took optimizer step 0; the timed steps are 1..6: look steps at every k-th counter value
    for name, k in (("looksam-k2", 2), ("looksam-b/4-k3", 3)):
        seen = ranks[0]["variants"][name]["bytes"]
        assert seen == [2 * sgd_bytes if t % k == 0 else sgd_bytes for t in range(1, 7)], name
    records = report.summarize(cfg, 2, ranks)
    checks = {c["check"]: c for c in report.checks(records)}
    assert checks["all-reduce bytes looksam-off/sgd"]["ok"]
    assert checks["all-reduce bytes looksam-k2/sgd, off and look steps"]["ok"]
    assert "step time looksam-off/sgd" in checks and "step time looksam-off/sgd+reuse" in checks
