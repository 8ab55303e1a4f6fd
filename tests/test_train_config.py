"""Training config: YAML + overrides, validation that names the key, the shipped configs."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from dist_sam.train import cli
from dist_sam.train.config import TrainConfig, dump_yaml, load_config, parse_overrides, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "launch", "configs", "*.yaml")))
BASE = ["data.root=/nonexistent/dataset"]


def test_overrides_parse_as_yaml():
    tree = parse_overrides(["optim.lr=5e-4", "run.epochs=3", "sam.mu=auto", "data.channels_last=true", "sam=null"])
    assert tree == {"optim": {"lr": 5e-4}, "run": {"epochs": 3}, "sam": None, "data": {"channels_last": True}}
    assert isinstance(tree["optim"]["lr"], float)
    assert load_config(None, BASE + ["sam.variant=rwsam", "sam=null"]).sam is None  # plain SGD
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ValueError, match="'lr'"):
        load_config(None, BASE + ["lr=0.1"])


def test_yaml_reads_exponent_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 5e-4\n  lr: 1e-1\ndata:\n  root: x\n")
    cfg = load_config(str(path))
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.lr == 0.1


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("run.epochs=0", "run.epochs"),
    ("run.precision=fp8", "run.precision"),
    ("model.name=vgg16", "model.name"),
    ("optim.base=lamb", "optim.base"),
    ("optim.label_smoothing=1.5", "optim.label_smoothing"),
    ("schedule.warmup_epochs=-2", "schedule.warmup_epochs"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("sam.variant=gsam", "sam.variant"),
    ("sam.rho=-0.1", "sam.rho"),
    ("sam.ascent=sideways", "sam.ascent"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.backend=opencv", "data.backend"),
    ("optim.lrr=0.1", "optim.lrr"),
    ("trainer.epochs=3", "trainer"),
])
def test_bad_values_raise_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, BASE + [override])


def test_data_root_is_required():
    with pytest.raises(ValueError, match="data.root"):
        load_config(None, ["run.epochs=1"])


def test_cli_refuses_bad_config_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "out"
    status = cli.main(["--config", os.path.join(REPO, "launch", "configs", "demo.yaml"), f"run.output_dir={out}",
                       "sam.lam=-1"])
    assert status == 2 and "sam.lam" in capsys.readouterr().err
    assert not out.exists()  # nothing was written, no process group, no data read


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert TrainConfig.from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg  # the resolved config round-trips


def test_imagenet_recipe():
    """The paper's §5.1 ImageNet recipe, and the same rho for SAM and RW-SAM."""
    cfgs = {name: load_config(os.path.join(REPO, "launch", "configs", f"imagenet_resnet50_{name}.yaml"))
            for name in ("sgd", "sam", "rwsam")}
    for cfg in cfgs.values():
        assert (cfg.run.epochs, cfg.optim.lr, cfg.optim.momentum, cfg.data.batch_size) == (90, 0.05, 0.9, 128)
        assert cfg.model.name == "resnet50" and cfg.schedule.min_lr_ratio == 0.0 and cfg.data.image_size == 224
    assert cfgs["sgd"].sam is None
    assert cfgs["sam"].sam.variant == "sam" and cfgs["rwsam"].sam.variant == "rwsam"
    assert cfgs["sam"].sam.rho == cfgs["rwsam"].sam.rho and cfgs["rwsam"].sam.ascent == "local"


def test_demo_config_is_rwsam_local_dali_cpu():
    cfg = load_config(os.path.join(REPO, "launch", "configs", "demo.yaml"))
    assert (cfg.sam.variant, cfg.sam.ascent, cfg.data.backend, cfg.data.device) == ("rwsam", "local", "dali", "cpu")


def test_print_config(capsys):
    assert cli.main(["--config", CONFIGS[0], "--print-config", "run.epochs=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["epochs"] == 7


def test_resolved_config_is_plain_data():
    tree = to_dict(load_config(None, BASE + ["sam.variant=rwsam"]))
    assert yaml.safe_load(yaml.safe_dump(tree)) == tree
