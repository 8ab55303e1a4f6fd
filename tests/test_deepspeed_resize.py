"""``launch/train.py --deepspeed`` resumed at another world size (2 -> 1, CPU, gloo).

2 workers x micro 8 are re-planned to 1 worker x micro 8 x ``gradient_accumulation_steps`` 2:
global batch 16 and m = 8 kept, the same samples in the same ascent groups, each group with its
RW-SAM directions and calibrated ``mu`` (rank 1's ``mu`` is rewritten in the step-2 checkpoint, so
the two groups differ by construction). ZeRO-2's partitioned optimizer states go through
DeepSpeed's universal checkpoint; ZeRO-0 loads its whole states as saved. The resized run's final
weights equal the uninterrupted 2-worker run's up to fp32 reduction order.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from dist_sam.train.models import build_model
from test_train_run import make_tiny_dataset, tiny_config, torchrun, weights, worker_env

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")
# the JIT-built comm op in a cache of our own, as tests/test_deepspeed.py (other builds force rebuilds)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                           "dist_sam_tests"))

TOLERANCE = 1e-5  # fp32 reduction order over 4 steps (as the DDP test); measured: printed with -s


def _ds_json(path: str, stage: int) -> str:
    with open(path, "w") as fh:
        json.dump({"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                   "steps_per_print": 10**6}, fh)  # the sam section: the YAML's (RW-SAM, mu auto)
    return path


def _run(args: list[str], nproc: int):
    return torchrun(args, nproc=nproc, env=worker_env(DS_ACCELERATOR="cpu"), timeout=400)


def _give_rank_its_own_mu(output_dir: str, step: int, rank: int, factor: float) -> list[float]:
    """Multiply ``rank``'s saved RW-SAM ``mu`` (SAMEngine's per-rank client state) by ``factor``, in
    every engine file holding it (one below ZeRO-3, one per rank at ZeRO-3)."""
    paths = glob.glob(os.path.join(output_dir, "checkpoints", f"step_{step:09d}", "*mp_rank_00_model_states.pt"))
    assert paths
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)
        per_rank = state["dist_sam"]["per_rank"]
        per_rank[rank]["rwsam"]["mu"] *= factor
        torch.save(state, path)
    return [r["rwsam"]["mu"] for r in per_rank]


def _param_diff(a_dir: str, b_dir: str) -> float:
    """The largest difference between two runs' final parameters (``model.pt``; not BN statistics)."""
    a, b = weights(a_dir), weights(b_dir)
    params = [n for n, _ in build_model("small_cnn", num_classes=4).named_parameters()]
    return max((a[n].double() - b[n].double()).abs().max().item() for n in params)


@pytest.mark.parametrize("stage,base", [(2, "adamw"), (0, "sgd")])
def test_deepspeed_2_to_1_keeps_global_batch_and_m_and_matches_the_2_worker_run(tmp_path, stage, base):
    """ZeRO-2 through the universal checkpoint (Adam's states: what ds_to_universal converts);
    ZeRO-0 with SGD momentum, its whole states as saved."""
    data = make_tiny_dataset(str(tmp_path / "data"))
    out, reference = str(tmp_path / "resized"), str(tmp_path / "reference")
    lr = {"optim__lr": 0.01} if base == "adamw" else {}
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out, optim__base=base, **lr)
    ds = _ds_json(str(tmp_path / "ds.json"), stage)
    _run(["--config", cfg, "--deepspeed", ds, "run.stop_at_step=2"], 2)
    mus = _give_rank_its_own_mu(out, 2, 1, 10.0)
    assert mus[0] != mus[1]
    shutil.copytree(out, reference)
    _run(["--config", tiny_config(str(tmp_path / "r.yaml"), data, reference, optim__base=base, **lr), "--deepspeed",
          ds], 2)
    log = _run(["--config", cfg, "--deepspeed", ds], 1).stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["global_step"] == 6 and "step_000000002" in summary["resumed_from"]
    assert summary["batch_plan"] == {"world_size": 1, "batch_size": 16, "accumulation_steps": 2}
    assert ("universal checkpoint format" in log) == (stage != 0), log[-3000:]
    assert "re-planned for world size 1: per-worker batch 8 -> 16, accumulation_steps 1 -> 2" in log, log[-3000:]
    diff = _param_diff(reference, out)
    print(f"\nZeRO-{stage} ({base}) 2->1: max |w_2_workers - w_resized| over parameters = {diff:.3g}")
    assert diff <= TOLERANCE


def test_resizes_deepspeed_cannot_load_are_refused_naming_what_works(tmp_path):
    from dist_sam.checkpoint import CheckpointError
    from dist_sam.train.ds_resize import check_resizable

    zero2 = {"zero_optimization": {"stage": 2}}
    with pytest.raises(CheckpointError, match="ds_to_universal.py:154.*not sgd's.*ZeRO-1/2/3 with optim.base adam"):
        check_resizable(zero2, "sgd", 2, 1, str(tmp_path))
    zero3 = {"zero_optimization": {"stage": 3}}
    with pytest.raises(CheckpointError, match="ZeRO-3 states only.*ds_to_universal.py:196 and stage3.py:3665.*"
                                              "not sgd's.*ZeRO-1/2/3 with optim.base adam or adamw"):
        check_resizable(zero3, "sgd", 2, 1, str(tmp_path))
    check_resizable(zero3, "adam", 2, 1, str(tmp_path))
    with pytest.raises(CheckpointError, match="ZeRO-0 bf16.*ZeRO-0 in fp32"):
        check_resizable({"bf16": {"enabled": True}}, "sgd", 2, 1, str(tmp_path))
    check_resizable({**zero2, "bf16": {"enabled": True}}, "AdamW", 2, 1, str(tmp_path))
    check_resizable({}, "sgd", 2, 1, str(tmp_path))
