"""``launch/train.py --deepspeed`` under ZeRO-3 (CPU, gloo, AdamW).

The module's parameters are partitioned: ``model.pt`` and the replica digests come from the whole
parameters, gathered on every rank. A ZeRO-3 run equals the ZeRO-2 run of the same config; stopped
at step 2 and resumed at the same world size it equals the uninterrupted run bit for bit; resumed
at world size 1 it goes through DeepSpeed's universal checkpoint (whose stage-3 loader restores the
fp32 weights and Adam's moments) and equals the uninterrupted 2-worker run. A universal copy with
its ``exp_avg`` zeroed does not: the moments are what the comparison tests.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from test_deepspeed_resize import TOLERANCE, _ds_json, _give_rank_its_own_mu, _param_diff, _run
from test_train_run import assert_bit_equal, make_tiny_dataset, tiny_config, weights

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")
ADAMW = {"optim__base": "adamw", "optim__lr": 0.01}


def _summary(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)


def test_zero3_equals_zero2_and_resumes_bit_equal(tmp_path):
    """Fixed ``mu``: with ``mu="auto"`` RW-SAM picks 1e-6 / 1e-5 here, and a finite difference over
    so small a step turns fp32 rounding differences between the stages into 1e-2 weight differences."""
    data = make_tiny_dataset(str(tmp_path / "data"))

    def cfg(name: str) -> str:
        return tiny_config(str(tmp_path / f"{name}.yaml"), data, str(tmp_path / name), sam__mu=0.01, **ADAMW)

    zero2, zero3 = _ds_json(str(tmp_path / "z2.json"), 2), _ds_json(str(tmp_path / "z3.json"), 3)
    _run(["--config", cfg("zero2"), "--deepspeed", zero2], 2)
    _run(["--config", cfg("zero3"), "--deepspeed", zero3], 2)
    split = cfg("split")
    _run(["--config", split, "--deepspeed", zero3, "run.stop_at_step=2"], 2)
    assert glob.glob(str(tmp_path / "split" / "checkpoints" / "step_000000002" / "zero_pp_rank_1_*model_states.pt"))
    _run(["--config", split, "--deepspeed", zero3], 2)
    summary = _summary(str(tmp_path / "zero3"))
    assert summary["finished"] and summary["global_step"] == 6
    assert all(w.shape == v.shape for w, v in zip(weights(str(tmp_path / "zero3")).values(),
                                                  weights(str(tmp_path / "zero2")).values()))  # whole tensors
    diff = _param_diff(str(tmp_path / "zero2"), str(tmp_path / "zero3"))
    print(f"\nZeRO-3 vs ZeRO-2 (AdamW, RW-SAM fd, mu 0.01): max |w| difference over parameters = {diff:.3g}")
    assert diff <= TOLERANCE
    assert "step_000000002" in _summary(str(tmp_path / "split"))["resumed_from"]
    assert_bit_equal(weights(str(tmp_path / "zero3")), weights(str(tmp_path / "split")))


def _zero_moments(out: str, step: int) -> None:
    """Convert ``out``'s tag as the trainer would, then zero every ``exp_avg`` of the universal copy."""
    from dist_sam.train.ds_resize import UNIVERSAL, _convert

    tag = os.path.join(out, "checkpoints", f"step_{step:09d}")
    _convert(tag, os.path.join(tag, UNIVERSAL))
    files = glob.glob(os.path.join(tag, UNIVERSAL, "zero", "*", "exp_avg.pt"))
    assert files
    for path in files:
        torch.save(torch.zeros_like(torch.load(path, weights_only=False)), path)


def test_zero3_2_to_1_through_the_universal_checkpoint_matches_the_2_worker_run(tmp_path):
    """RW-SAM ``mu="auto"``, rank 1's ``mu`` rewritten (each ascent group keeps its own)."""
    data = make_tiny_dataset(str(tmp_path / "data"))
    out, reference, broken = (str(tmp_path / n) for n in ("resized", "reference", "broken"))
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out, **ADAMW)
    ds = _ds_json(str(tmp_path / "ds.json"), 3)
    _run(["--config", cfg, "--deepspeed", ds, "run.stop_at_step=2"], 2)
    mus = _give_rank_its_own_mu(out, 2, 1, 10.0)
    assert mus[0] != mus[1]
    shutil.copytree(out, reference)
    shutil.copytree(out, broken)
    _run(["--config", tiny_config(str(tmp_path / "r.yaml"), data, reference, **ADAMW), "--deepspeed", ds], 2)
    log = _run(["--config", cfg, "--deepspeed", ds], 1).stderr
    summary = _summary(out)
    assert summary["finished"] and summary["global_step"] == 6 and "step_000000002" in summary["resumed_from"]
    assert summary["batch_plan"] == {"world_size": 1, "batch_size": 16, "accumulation_steps": 2}
    assert "universal checkpoint format" in log, log[-3000:]
    diff = _param_diff(reference, out)
    print(f"\nZeRO-3 (adamw) 2->1: max |w_2_workers - w_resized| over parameters = {diff:.3g}")
    assert diff <= TOLERANCE
    _zero_moments(broken, 2)
    _run(["--config", tiny_config(str(tmp_path / "b.yaml"), data, broken, **ADAMW), "--deepspeed", ds], 1)
    wrong = _param_diff(reference, broken)
    print(f"ZeRO-3 2->1 with exp_avg zeroed in the universal copy: max difference = {wrong:.3g}")
    assert wrong > 100 * TOLERANCE
