"""The trainer with ``model.parallel: fsdp`` at world size 2 under torchrun (gloo, CPU).

Checkpoints go through torch.distributed.checkpoint (every rank writes its shard); a SIGKILLed
worker restarts and resumes bit-equal to the uninterrupted run; a world-size change re-shards; the
export gives a plain state dict that loads into the unsharded model; a tiny ViT takes the encoder-
block units path.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_sam.checkpoint import list_checkpoints, read_manifest
from dist_sam.train.config import TrainConfig
from dist_sam.train.models import build_model
from test_train_run import REPO, assert_bit_equal, make_tiny_dataset, tiny_config, torchrun, weights, worker_env

pytestmark = pytest.mark.slow

FSDP = dict(model__parallel="fsdp", sam__variant="sam", sam__lam=None, sam__mu=None)


def _config(path, data, out, **overrides):
    cfg = tiny_config(path, data, out, **{**FSDP, **overrides})
    import yaml
    tree = yaml.safe_load(open(cfg))
    tree["sam"] = {k: v for k, v in tree["sam"].items() if v is not None}
    yaml.safe_dump(tree, open(cfg, "w"))
    return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = make_tiny_dataset(str(root / "data"))
    out = str(root / "straight")
    torchrun(["--config", _config(str(root / "c.yaml"), data, out)])
    return data, out


def test_fsdp_run_writes_sharded_checkpoints_and_agrees_across_ranks(straight):
    _, out = straight
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["world_size"] == 2 and summary["replicas_agree"]
    assert summary["config"]["model"]["parallel"] == "fsdp"
    last = list_checkpoints(os.path.join(out, "checkpoints"))[-1]
    manifest = read_manifest(last)
    assert manifest["meta"]["engine"] == "fsdp"
    shards = {name for name in manifest["files"] if name.startswith("dcp/__")}
    assert len(shards) == 2  # every rank wrote its own shard file, each checksummed in the manifest
    assert "dcp/.metadata" in manifest["files"] and "state.pt" in manifest["files"]


def test_worker_killed_mid_epoch_restarts_and_matches_bit_for_bit(straight, tmp_path):
    data, ref = straight
    out = str(tmp_path / "killed")
    torchrun(["--config", _config(str(tmp_path / "c.yaml"), data, out)], extra=("--max-restarts=1", "--monitor-interval=0.5"),
             env=worker_env(DIST_SAM_FAULT_AT_STEP="1:5"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from"] is not None and summary["finished"]
    assert_bit_equal(weights(out), weights(ref))


def test_export_gives_a_plain_state_dict_for_the_unsharded_model(straight, tmp_path):
    _, out = straight
    last = list_checkpoints(os.path.join(out, "checkpoints"))[-1]
    target = str(tmp_path / "plain.pt")
    done = subprocess.run([sys.executable, "-m", "dist_sam.cli", "export-checkpoint", last, target],
                          capture_output=True, text=True, cwd=REPO, env=worker_env())
    assert done.returncode == 0, done.stderr
    state = torch.load(target, weights_only=True)
    model = build_model("small_cnn", num_classes=4)
    model.load_state_dict(state)  # strict: every key, every shape
    final = weights(out)  # the run's final weights (written after the last checkpoint's step)
    for name, p in model.state_dict().items():
        if name.endswith("num_batches_tracked") or "running" in name:
            continue  # buffers: rank 0's, broadcast like DDP's, also equal but compared below
        assert torch.equal(p, final[name]), name
    # A damaged shard is named, not loaded.
    shard = sorted(glob.glob(os.path.join(last, "dcp", "__1_*")))[0]
    with open(shard, "r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00\x01\x02")
    bad = subprocess.run([sys.executable, "-m", "dist_sam.cli", "export-checkpoint", last, target + "2"],
                         capture_output=True, text=True, cwd=REPO, env=worker_env())
    assert bad.returncode == 1 and "SHA-256" in bad.stderr and "__1_" in bad.stderr


def test_world_size_change_reshards_the_fsdp_checkpoint(straight, tmp_path):
    data, ref = straight
    out = str(tmp_path / "ws")
    cfg = _config(str(tmp_path / "c.yaml"), data, out, run__stop_at_step=3)
    torchrun(["--config", cfg])
    cfg1 = _config(str(tmp_path / "c1.yaml"), data, out)
    torchrun(["--config", cfg1], nproc=1)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 1 and summary["batch_plan"]["accumulation_steps"] == 2
    a, b = weights(out), weights(ref)
    # Same samples per step; only the reduction order differs. BatchNorm running statistics follow
    # rank 0's forwards, which see other samples at another world size (as under DDP).
    for name in (n for n in a if "running" not in n and "num_batches" not in n):
        assert (a[name].double() - b[name].double()).abs().max() < 1e-5, name


def test_vit_trains_with_encoder_block_units(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "vit")
    cfg = _config(str(tmp_path / "c.yaml"), data, out, model__name="vit_tiny", run__epochs=1, data__image_size=16,
                  sam__variant="rwsam", sam__estimator="last_layer", model__fsdp_memory="lean")
    torchrun(["--config", cfg])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["replicas_agree"]
    assert all(torch.isfinite(t).all() for t in weights(out).values() if t.is_floating_point())


@pytest.mark.parametrize("overrides, key", [
    ({"run__precision": "fp16"}, "run.precision"),
    ({"model__fsdp_memory": "lean", "sam__variant": "asam"}, "model.fsdp_memory"),
    ({"model__parallel": "zero"}, "model.parallel"),
])
def test_bad_fsdp_configs_are_refused_naming_the_field(tmp_path, overrides, key):
    import yaml
    path = _config(str(tmp_path / "c.yaml"), str(tmp_path), str(tmp_path / "o"), **overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TrainConfig.from_dict(yaml.safe_load(open(path)))
