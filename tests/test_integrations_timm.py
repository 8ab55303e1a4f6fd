"""timm models in dist-sam: ``model.name: timm/<name>``, the SAM step, RW-SAM ``last_layer``, the trainer.

Tiny random-init timm test models (``test_efficientnet``: BatchNormAct2d, ~0.1 M parameters;
``test_vit``: LayerNorm and attention); nothing is downloaded. The SAM step is compared with an
independent float64 re-derivation of ``e = rho·g/||g||``, ``w ← w − lr·∇L(w + e)`` written here.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

timm = pytest.importorskip("timm")
import timm.data  # noqa: E402
import timm.loss  # noqa: E402

import dist_sam  # noqa: E402
from dist_sam.train.models import build_model  # noqa: E402
from dist_sam.train.sections import ModelConfig  # noqa: E402

from test_train_run import REPO, make_tiny_dataset, tiny_config, torchrun  # noqa: E402

CE = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture
def offline(monkeypatch):
    """Any download attempt fails: HF offline, no sockets, timm's pretrained loader raises."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)


def test_build_model_gives_timm_class_with_random_head_offline(offline):
    model = build_model("timm/resnet18", num_classes=7, channels_last=True)
    assert type(model) is timm.models.resnet.ResNet
    assert model.get_classifier().out_features == 7 and model.fc is model.get_classifier()
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    vit = build_model("timm/test_vit", num_classes=3, image_size=32)  # data.image_size reaches the ViT
    assert type(vit) is timm.models.vision_transformer.VisionTransformer and vit.patch_embed.img_size == (32, 32)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # sync_bn keeps timm's fused BatchNorm + activation (torch's converter would drop the activation)
    net = build_model("timm/test_efficientnet", num_classes=3, sync_bn=True)
    synced = [m for m in net.modules() if isinstance(m, timm.layers.SyncBatchNormAct)]
    assert synced and not any(type(m) is timm.layers.BatchNormAct2d for m in net.modules())
    assert not any(isinstance(m.act, nn.Identity) for m in synced[:1])


@pytest.mark.parametrize("name", ["timm/not_a_model", "timm/", "timm/resnet5O", "resnet101"])
def test_unknown_names_are_refused_at_config_time(name):
    with pytest.raises(ValueError) as err:
        ModelConfig(name=name)
    msg = str(err.value)
    assert "model.name" in msg and repr(name) in msg and "timm.list_models()" in msg and "small_cnn" in msg
    if name == "timm/resnet5O":
        assert "timm/resnet50" in msg  # close matches
    with pytest.raises(ValueError, match="timm.list_models"):
        build_model(name, num_classes=3)


_CORE = """
import sys
import dist_sam
from dist_sam.train.sections import ModelConfig
from dist_sam.train.models import build_model
ModelConfig(name="resnet18"); build_model("small_cnn", num_classes=3)
assert "timm" not in sys.modules, "timm was imported"
"""
_MISSING = """
import sys
sys.modules["timm"] = None  # makes `import timm` raise ImportError
from dist_sam.train.sections import ModelConfig
try:
    ModelConfig(name="timm/resnet50")
except ImportError as err:
    print(err)
"""


def test_timm_is_imported_only_for_timm_names_and_its_absence_names_the_extra():
    core = subprocess.run([sys.executable, "-c", _CORE], capture_output=True, text=True, cwd=REPO)
    assert core.returncode == 0, core.stderr
    missing = subprocess.run([sys.executable, "-c", _MISSING], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 0 and "pip install 'dist-sam[timm]'" in missing.stdout, missing.stderr


def _tiny(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes=3, image_size=32).double().train()


def _batch(n: int = 6, size: int = 32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _reference_sam_step(model, x, y, *, rho, lr, weights=None):
    """SAM by hand: ascent gradient g of mean(a_i f_i) at w (this forward updates BatchNorm running
    statistics), e = rho·g/||g||, descent gradient of the mean loss at w + e (statistics put back),
    w ← w − lr·g(w + e). Returns the new parameters and buffers."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    losses = F.cross_entropy(ref(x), y, reduction="none")
    g = torch.autograd.grad(losses.mean() if weights is None else (weights * losses).mean(), params)
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    w = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / norm)
    g_desc = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    new = {n: wi - lr * gd for (n, _), wi, gd in zip(ref.named_parameters(), w, g_desc)}
    sgd = {n: wi - lr * gi for (n, _), wi, gi in zip(ref.named_parameters(), w, g)}
    return new, buffers, sgd


@pytest.mark.parametrize("name", ["timm/test_efficientnet", "timm/test_vit"])
def test_one_sam_step_on_a_timm_model_equals_the_formula(name):
    model = _tiny(name)
    x, y = _batch()
    rho, lr = 0.05, 0.5
    expected, buffers, sgd = _reference_sam_step(model, x, y, rho=rho, lr=lr)
    opt = dist_sam.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    dist_sam.sam_step(model, opt, CE, x, y)
    got = dict(model.named_parameters())
    err = max((got[n] - expected[n]).abs().max().item() for n in expected)
    off_sgd = max((got[n] - sgd[n]).abs().max().item() for n in expected)
    assert err < 1e-10 and off_sgd > 1e-6, (err, off_sgd)  # the test tells SAM from SGD
    # BatchNormAct2d's running statistics: updated by the ascent forward only
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def _head_input(model, x):
    """The classifier's input h and the logits z, read by a hook on timm's own get_classifier()."""
    seen = {}
    handle = model.get_classifier().register_forward_hook(lambda m, i, o: seen.update(h=i[0].detach()))
    with torch.no_grad():
        z = copy.deepcopy(model)(x)  # a copy: the real model's BatchNorm statistics stay put
    handle.remove()
    return seen["h"], z


@pytest.mark.parametrize("name", ["timm/test_efficientnet", "timm/test_vit"])
def test_rwsam_last_layer_finds_the_timm_head_and_reweights_the_ascent(name):
    model = _tiny(name)
    x, y = _batch()
    h, z = _head_input(model, x)
    s = (torch.softmax(z, 1) - F.one_hot(y, 3).double()).norm(dim=1) * (h.pow(2).sum(1) + 1).sqrt()
    lam = 0.5
    a = 6 * torch.softmax(lam * (s - s.mean()) / s.std(), 0)  # a_i = b·softmax(lam·zscore(s))
    expected, _, _ = _reference_sam_step(model, x, y, rho=0.05, lr=0.5, weights=a)
    opt = dist_sam.create_optimizer("rwsam", model.parameters(), base="sgd", lr=0.5, rho=0.05, lam=lam,
                                    estimator="last_layer")
    dist_sam.sam_step(model, opt, CE, x, y)
    torch.testing.assert_close(opt.last_estimates, s, rtol=1e-10, atol=1e-12)
    got = dict(model.named_parameters())
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) < 1e-10


def test_last_layer_refuses_a_timm_model_with_two_heads():
    # DeiT-distilled: get_classifier() is (head, head_dist); the last nn.Linear would be head_dist
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=32,
                              depth=1, embed_dim=32, num_heads=2)
    opt = dist_sam.create_optimizer("rwsam", model.parameters(), lr=0.1, estimator="last_layer")
    with pytest.raises(ValueError, match="get_classifier"):
        with opt.ascent_context(model):
            pass


def test_compiled_timm_model_matches_eager():
    """``torch.compile`` (aot_eager: dynamo and AOTAutograd, eager kernels) on a timm ViT: two SAM steps
    equal eager ones."""
    x, y = _batch(size=32)
    x = x.float()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("timm/test_vit", num_classes=3, image_size=32)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        graphs = counters["stats"]["unique_graphs"]
        opt = dist_sam.create_optimizer("sam", model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
        for _ in range(2):
            dist_sam.sam_step(run, opt, CE, x, y)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        assert (counters["stats"]["unique_graphs"] > graphs) == compiled  # dynamo did trace the timm ViT
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_trainer_runs_a_timm_model_on_2_processes(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out, model__name="timm/test_efficientnet")
    torchrun(["--config", cfg])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 2 and summary["global_step"] == 6 and summary["replicas_agree"]
    assert summary["comm_per_step"]["allreduce_calls_per_step"] == 1.0  # local ascent: one all-reduce, as SGD
    weights = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert weights["classifier.weight"].shape[0] == 4  # the head sized from the class folders


def test_soft_target_cross_entropy_is_the_mean_of_the_per_sample_loss():
    """The recipe's claim: timm's SoftTargetCrossEntropy (Mixup/CutMix targets) reduces to a mean,
    and nn.CrossEntropyLoss(reduction="none") on the same soft targets is its per-sample form."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64)
    mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    _, soft = mixup(torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,), generator=g))
    per_sample = CE(logits, soft.double())
    assert per_sample.shape == (8,)
    torch.testing.assert_close(per_sample.mean(), timm.loss.SoftTargetCrossEntropy()(logits, soft.double()),
                               rtol=1e-12, atol=1e-12)
    # BinaryCrossEntropy (timm's BCE recipe) averages over samples and classes: per sample, mean(1)
    bce = timm.loss.BinaryCrossEntropy(smoothing=0.1, reduction="none")(logits, soft.double()).mean(1)
    torch.testing.assert_close(bce.mean(), timm.loss.BinaryCrossEntropy(smoothing=0.1)(logits, soft.double()),
                               rtol=1e-12, atol=1e-12)


def test_timm_scheduler_drives_the_sam_optimizer():
    """SAM shares timm's optimizer's param groups, so a timm scheduler sets the lr SAM steps with."""
    import timm.optim
    import timm.scheduler

    model = build_model("timm/test_vit", num_classes=3, image_size=32)
    base = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    opt = dist_sam.SAM(None, base, rho=0.05)
    assert len(opt.param_groups) == 2  # timm's decay and no-decay groups
    sched, _ = timm.scheduler.create_scheduler_v2(opt, "cosine", num_epochs=10, warmup_epochs=2, warmup_lr=1e-5)
    sched.step(5)
    assert [g["lr"] for g in base.param_groups] == [g["lr"] for g in opt.param_groups] != [1e-3, 1e-3]


def test_timm_recipe_runs_two_steps_on_synthetic_data():
    import importlib.util

    spec = importlib.util.spec_from_file_location("timm_recipe", os.path.join(REPO, "launch", "examples", "timm_recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = recipe.main(["--model", "test_efficientnet", "--synthetic", "--image-size", "32", "--steps", "2",
                       "--batch-size", "4", "--num-classes", "5"])
    assert len(out["losses"]) == 2 and all(torch.isfinite(torch.tensor(out["losses"])))
    w = dict(out["model"].named_parameters())
    ema = dict(out["ema"].named_parameters())
    assert all(torch.isfinite(v).all() for v in ema.values())
    assert any(not torch.equal(ema[k], w[k]) for k in w)  # the EMA trails the weights


def test_fsdp_units_are_a_timm_models_blocks_or_stages():
    from dist_sam.train.parallel import fsdp_units

    for name, attr in (("timm/test_vit", "blocks"), ("timm/test_convnext", "stages"), ("timm/test_resnet", None)):
        model = build_model(name, num_classes=3, image_size=32)
        units = fsdp_units(model)
        expected = list(getattr(model, attr)) if attr else [model.layer1, model.layer2, model.layer3, model.layer4]
        assert len(units) == len(expected) > 1 and all(u is e for u, e in zip(units, expected)), name
