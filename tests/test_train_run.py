"""End-to-end training in one process: outputs, summary, bit-exact resume at world size 1.

Also the helpers the other training tests import: a tiny ImageNet-layout dataset and a tiny config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dist_sam.checkpoint import list_checkpoints, load_checkpoint
from dist_sam.train import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "launch", "train.py")


def make_tiny_dataset(root: str, num_classes: int = 4, train_per_class: int = 12, val_per_class: int = 5, size: int = 16) -> str:
    """Colored-noise JPEGs, one dominant color per class, in the ImageNet layout."""
    rng = np.random.default_rng(0)
    colors = rng.integers(40, 216, (num_classes, 3))
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n):
                pixels = np.clip(colors[c] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"class{c}", f"img{i}.JPEG"), quality=90)
    return root


def tiny_config(path: str, data_root: str, output_dir: str, **overrides) -> str:
    """Write a tiny, deterministic RW-SAM config (torchvision backend) with dotted-key overrides."""
    tree = {
        "run": {"output_dir": output_dir, "seed": 0, "epochs": 2, "deterministic": True, "progress": False,
                "tensorboard": False, "log_every": 1},
        "model": {"name": "small_cnn"},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"warmup_epochs": 0.5},
        "sam": {"variant": "rwsam", "ascent": "local", "rho": 0.05, "lam": 0.5, "mu": "auto"},
        "data": {"root": data_root, "backend": "torchvision", "device": "cpu", "image_size": 16, "batch_size": 8,
                 "num_workers": 0, "validate_files": False},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        if section == "sam" and value is None and name == "all":
            tree["sam"] = None
        else:
            tree[section][name] = value
    with open(path, "w") as fh:
        yaml.safe_dump(tree, fh)
    return path


def worker_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def torchrun(args: list[str], nproc: int = 2, extra: tuple = (), env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, TRAIN, *args]
    done = subprocess.run(cmd, env=env or worker_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"
    return done


def weights(output_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(output_dir, "model.pt"), weights_only=True)


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(autouse=True)
def _one_thread_and_restore_determinism():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def test_run_writes_outputs_and_summary(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, run__tensorboard=True, optim__label_smoothing=0.1)
    assert cli.main(["--config", cfg]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["epochs_completed"] == 2 and summary["global_step"] == 12
    assert 0 <= summary["top1"] <= summary["top5"] <= 100 and summary["history"][-1]["num_samples"] == 20
    assert summary["images_per_second"] > 0 and {"data_ms", "step_ms", "checkpoint_ms"} <= set(summary["step_time_ms"])
    assert summary["comm_per_step"] is None  # one process: no all-reduce
    assert summary["config"]["sam"]["variant"] == "rwsam" and summary["config"]["optim"]["label_smoothing"] == 0.1
    assert yaml.safe_load(open(os.path.join(out, "config.yaml"))) == summary["config"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
    assert len(list_checkpoints(os.path.join(out, "checkpoints"))) == 2  # keep_last


def test_resume_is_bit_exact_world_size_1(tiny_data, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert cli.main(["--config", tiny_config(str(tmp_path / "a.yaml"), tiny_data, straight)]) == 0
    cfg = tiny_config(str(tmp_path / "b.yaml"), tiny_data, split)
    assert cli.main(["--config", cfg, "run.stop_at_step=3"]) == 0  # mid-epoch, between two checkpoints
    assert not json.load(open(os.path.join(split, "summary.json")))["finished"]
    assert cli.main(["--config", cfg]) == 0
    summary = json.load(open(os.path.join(split, "summary.json")))
    assert summary["finished"] and summary["resumed_from"].endswith("step_000000003")
    assert_bit_equal(weights(straight), weights(split))
    a, b = (load_checkpoint(list_checkpoints(os.path.join(d, "checkpoints"))[-1]) for d in (straight, split))
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["optimizer"]["rwsam"] == b["optimizer"]["rwsam"] and a["scheduler"] == b["scheduler"]


def test_resume_refuses_another_config(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "c.yaml"), tiny_data, out, sam__all=None)  # plain SGD: quick
    assert cli.main(["--config", cfg, "run.stop_at_step=2"]) == 0
    assert cli.main(["--config", cfg, "optim.lr=0.2"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "different config" in err


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet50"])
def test_models(name):
    from dist_sam.train.models import build_model

    model = build_model(name, num_classes=7, channels_last=True, sync_bn=True)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_model(name, num_classes=7).eval()
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_warmup_cosine():
    from dist_sam.train.schedule import lr_factor

    f = [lr_factor(s, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) for s in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and abs(f[10] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # non-increasing after warmup
