"""``sam_step`` / ``base_step`` / the trainer on a ``torch.compile``-d model (dist_sam.compiled).

Breadth runs under ``backend="aot_eager"`` (dynamo traces the forward, AOTAutograd traces the
backward, eager kernels run them: every graph, guard and recompilation of inductor, seconds
instead of minutes of C++ compilation on a 2-core CPU); one representative case (RW-SAM ``fd``
under m-SAM: ascent, frozen-BN descent and the ``functional_call`` forward) runs under
``inductor``, the default backend. Every compiled run is compared
with the same steps in eager mode (1e-5), and after two warm-up steps five more steps must compile
nothing: ``torch._dynamo.utils.counters`` must not gain a graph or a frame, and no frame may fall
back to eager (``frames.total == frames.ok``, no graph break). The DDP cases run on 2 real gloo
processes, in both wrapping orders, and count the gradient all-reduces (``CommCounter``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import dist_sam
from dist_sam.compiled import is_compiled, strip_compiled
from dist_sam.distributed.ddp import CommCounter, local_module, unwrap

from dist_utils import run_distributed
from reference import make_batch, make_cnn

CE = nn.CrossEntropyLoss(reduction="none")
WARMUP, STEPS = 2, 5
VARIANTS = {
    "sam": ("sam", dict(rho=0.05)),
    "usam": ("usam", dict(rho=0.05)),
    "asam": ("asam", dict(rho=0.5, eta=0.01)),
    "rwsam-fd": ("rwsam", dict(rho=0.05, estimator="fd", mu=1e-3)),
    "rwsam-exact": ("rwsam", dict(rho=0.05, estimator="exact")),
    "rwsam-last_layer": ("rwsam", dict(rho=0.05, estimator="last_layer")),
}


def _optimizer(variant, model):
    name, kw = VARIANTS[variant]
    return dist_sam.create_optimizer(name, model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, **kw)


def _step_kwargs(ascent, seed):
    if ascent == "micro":
        return dict(ascent="micro", micro_batch_size=4)
    if ascent == "full":
        return dict(ascent="full", ascent_data=[make_batch("cnn", 8, seed=100 + seed + i, dtype=torch.float32) for i in range(2)])
    return dict(ascent=ascent)


def _graph_state():
    return (counters["stats"]["unique_graphs"], counters["frames"]["total"], counters["frames"]["ok"],
            sum(counters["graph_break"].values()))


def _train(variant, ascent, backend, plain=False, steps=WARMUP + STEPS):
    """``steps`` steps on a fresh float32 CNN (conv, BN, linear); compiled unless ``backend`` is None."""
    torch._dynamo.reset()
    counters.clear()
    model = make_cnn(dtype=torch.float32)
    run = model if backend is None else torch.compile(model, backend=backend)
    opt = _optimizer(variant, model)
    after_warmup, losses = None, []
    for s in range(steps):
        if s == WARMUP:
            after_warmup = _graph_state()
        x, y = make_batch("cnn", 8, seed=s, dtype=torch.float32)
        if plain:
            losses.append(dist_sam.base_step(run, opt, CE, x, y))
        else:
            losses.append(dist_sam.sam_step(run, opt, CE, x, y, **_step_kwargs(ascent, s)))
    return model, torch.stack(losses), after_warmup, _graph_state()


def _assert_same(compiled, eager, tol=1e-5):
    (cm, cl, *_), (em, el, *_) = compiled, eager
    torch.testing.assert_close(cl, el, rtol=tol, atol=tol)
    for (name, p), q in zip(cm.state_dict().items(), em.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


def _assert_no_recompile(result):
    _, _, warm, end = result
    assert warm[0] >= 1, "nothing was compiled"
    assert end == warm, f"recompiled after warm-up: (graphs, frames, frames ok, graph breaks) {warm} -> {end}"
    assert end[1] == end[2] and end[3] == 0, f"a frame fell back to eager or broke its graph: {end}"


CASES = [(v, "local") for v in VARIANTS] + [(v, "micro") for v in ("sam", "asam", "rwsam-fd", "rwsam-last_layer")] + [("sam", "full")]


@pytest.mark.parametrize("variant,ascent", CASES)
def test_compiled_equals_eager_without_recompiling(variant, ascent):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _train(variant, ascent, "aot_eager")
    eager_exact = [w for w in caught if "estimator='exact' runs on the eager module" in str(w.message)]
    assert len(eager_exact) == (variant == "rwsam-exact"), "exact says once that it runs eagerly, nothing else does"
    _assert_no_recompile(compiled)
    _assert_same(compiled, _train(variant, ascent, None))


@pytest.mark.slow
def test_inductor_rwsam_fd_micro():
    """Inductor (C++ kernels) on the case with the most graphs: ascent, frozen-BN descent and the
    fd forward through ``functional_call``, per micro-batch."""
    compiled = _train("rwsam-fd", "micro", "inductor")
    _assert_no_recompile(compiled)
    _assert_same(compiled, _train("rwsam-fd", "micro", None))


def test_base_step_compiled():
    compiled = _train("sam", "local", "aot_eager", plain=True)
    _assert_no_recompile(compiled)
    _assert_same(compiled, _train("sam", "local", None, plain=True))


def test_unwrap_sees_through_compile():
    model = make_cnn(dtype=torch.float32)
    compiled = torch.compile(model, backend="aot_eager")
    assert is_compiled(compiled) and not is_compiled(model)
    assert strip_compiled(compiled) is model and unwrap(compiled) is model and unwrap(model) is model
    assert local_module(compiled) is compiled, "a compiled single-process model runs its extra forwards compiled"


def test_compiled_last_layer_uses_one_persistent_hook():
    model = make_cnn(dtype=torch.float32)
    compiled = torch.compile(model, backend="aot_eager")
    opt = _optimizer("rwsam-last_layer", model)
    compiled(make_batch("cnn", 8, seed=9, dtype=torch.float32)[0])  # compiled before the hook exists
    for s in range(2):
        x, y = make_batch("cnn", 8, seed=s, dtype=torch.float32)
        dist_sam.sam_step(compiled, opt, CE, x, y)
    assert len(model[-1]._forward_hooks) == 1, "one hook, kept: dynamo does not guard on hook changes"
    assert opt.last_weights is not None and not torch.equal(opt.last_weights, torch.ones(8))


# -- DDP, 2 gloo processes ------------------------------------------------------------------------
DDP_CASES = [("sam", "local"), ("sam", "micro"), ("sam", "global"), ("rwsam-fd", "local")]


def _ddp_worker(rank, world_size, order):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for variant, ascent in DDP_CASES if order == "ddp(compiled)" else DDP_CASES[:2]:
        results = {}
        for mode in ("eager", order):
            torch._dynamo.reset()
            counters.clear()
            module = make_cnn(dtype=torch.float32)
            if mode == "eager":
                model = DDP(module)
            elif mode == "ddp(compiled)":
                model = DDP(torch.compile(module, backend="aot_eager"))
            else:
                model = torch.compile(DDP(module), backend="aot_eager")
            comm = CommCounter.attach(model)
            opt = _optimizer(variant, module)
            calls = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for s in range(WARMUP + (STEPS if order == "ddp(compiled)" else 2)):
                    if s == WARMUP:
                        warm = _graph_state()
                    x, y = make_batch("cnn", 8, seed=10 * s + rank, dtype=torch.float32)
                    comm.reset()
                    dist_sam.sam_step(model, opt, CE, x, y, **_step_kwargs(ascent, s))
                    calls.append(comm.calls)
            results[mode] = dict(params=[p.detach().clone() for p in module.parameters()], calls=calls, warm=warm,
                                 end=_graph_state(), warnings=[str(w.message) for w in caught])
        out[f"{variant}/{ascent}"] = results
    return out


@pytest.mark.slow
@pytest.mark.parametrize("order", ["ddp(compiled)", "compiled(ddp)"])
def test_ddp_compiled_matches_eager_ddp(order):
    results = run_distributed(_ddp_worker, world_size=2, args=(order,), timeout=600)
    for rank_result in results:
        for case, r in rank_result.items():
            eager, comp = r["eager"], r[order]
            assert comp["calls"] == eager["calls"], f"{case}: all-reduces per step {comp['calls']} vs eager {eager['calls']}"
            for p, q in zip(comp["params"], eager["params"]):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=case)
            warned = [w for w in comp["warnings"] if "compiles nothing here" in w]
            if order == "ddp(compiled)":  # the supported order: compiled, and no recompilation after warm-up
                assert comp["warm"][0] >= 1 and comp["end"] == comp["warm"], f"{case}: {comp['warm']} -> {comp['end']}"
                assert comp["end"][1] == comp["end"][2] and not warned, (case, comp["end"], warned)
            else:  # exact, but dynamo skips DDP's forward: a warning, once per model, says so
                assert len(warned) == 1, (case, comp["warnings"])
    for case in results[0]:  # the replicas agree: the descent gradient was all-reduced
        for p, q in zip(results[0][case][order]["params"], results[1][case][order]["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


# -- the trainer ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_model_compile_matches_eager(tmp_path):
    from dist_sam.train import cli
    from test_train_run import make_tiny_dataset, tiny_config

    data = make_tiny_dataset(str(tmp_path / "data"))
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for compiled in (False, True):
            run_dir = str(tmp_path / f"run{int(compiled)}")
            cfg = tiny_config(str(tmp_path / f"c{int(compiled)}.yaml"), data, run_dir, run__epochs=1, sam__mu=1e-3,
                              model__compile=compiled, model__compile_backend="aot_eager", model__compile_mode="default")
            torch._dynamo.reset()
            counters.clear()
            assert cli.main(["--config", cfg]) == 0
            assert (counters["stats"]["unique_graphs"] > 0) == compiled, "model.compile decides whether dynamo compiles"
            out[compiled] = torch.load(f"{run_dir}/model.pt", weights_only=True)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert out[True].keys() == out[False].keys(), "the saved weights are the eager module's (no _orig_mod. prefix)"
    for name in out[True]:
        torch.testing.assert_close(out[True][name], out[False][name], rtol=1e-5, atol=1e-5, msg=name)


def test_train_config_compile_validation():
    from dist_sam.train.config import ModelConfig

    with pytest.raises(ValueError, match="model.compile_mode"):
        ModelConfig(compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="model.compile"):
        ModelConfig(compile="yes")
    with pytest.raises(ValueError, match="model.parallel=fsdp"):
        ModelConfig(compile=True, parallel="fsdp")
    assert ModelConfig(compile=True, compile_mode="max-autotune").compile_mode == "max-autotune"


def test_batched_msam_on_a_compiled_model_warns_and_runs_eagerly():
    compiled_model, eager_model = make_cnn(dtype=torch.float32), make_cnn(dtype=torch.float32)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    opts = _optimizer("sam", compiled_model), _optimizer("sam", eager_model)
    x, y = make_batch("cnn", 8, dtype=torch.float32)
    with pytest.warns(UserWarning, match="micro_impl='vmap' runs the eager module"):
        dist_sam.sam_step(compiled, opts[0], CE, x, y, ascent="micro", micro_batch_size=4, micro_impl="vmap")
    dist_sam.sam_step(eager_model, opts[1], CE, x, y, ascent="micro", micro_batch_size=4, micro_impl="vmap")
    for p, q in zip(compiled_model.state_dict().values(), eager_model.state_dict().values()):
        assert torch.equal(p, q)
