"""GPU check, DeepSpeed fp16 section: DeepSpeed's own dynamic loss scaling under SAM, ZeRO 0-3.

    python -m benchmarks.gpu.deepspeed_fp16 --out $OUT            # on the GPU (NCCL), < 1 min
    python -m benchmarks.gpu.deepspeed_fp16 --dry-run --out /tmp  # the same code on CPU + gloo

World size 1, a 2-conv CNN (32 px, batch 64 on the GPU), fp16 parameters, DeepSpeed's default
dynamic scale (2^16, hysteresis 2) so that the first steps overflow and the scale moves. Per stage:

* ``rho = 0`` SAM equals DeepSpeed's own fp16 step bit for bit, with the same loss-scale sequence
  and skipped-step count (ZeRO-0: the own step with the loss pre-scaled, DeepSpeed PR #8393);
* SAM (rho 0.05) with an inf in the ascent only at step 3: that step is skipped and the scale
  sequence equals the plain run's with an inf input at step 3; weights finite and moved.

The CPU dry run declares fp16 supported to DeepSpeed's CPU accelerator (it checks for AVX512-FP16);
on the GPU nothing is patched. Writes ``deepspeed_fp16_gpu_check.json``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from ..common.procs import world_of_one
from . import section_main

__all__ = ["run", "main"]

FULL = dict(image_size=32, batch_size=64, steps=6)
DRY = dict(image_size=16, batch_size=4, steps=6)
CE = nn.CrossEntropyLoss(reduction="none")


class _InfAt:
    """Per-sample CE times inf at the ``call``-th call (SAM calls it twice a step: ascent, descent)."""

    def __init__(self, call):
        self.call, self.calls = call, 0

    def __call__(self, outputs, targets):
        losses = CE(outputs, targets)
        losses = losses * float("inf") if self.calls == self.call else losses
        self.calls += 1
        return losses


def _engine(stage: int, rho: float, loss_fn, micro: int):
    import dist_sam.deepspeed as dsd

    torch.manual_seed(0)  # no BatchNorm: the CPU dry run has no fp16 batch-norm kernel
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 0.0, "zero_optimization": zero,
              "fp16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "sam": {"variant": "sam", "rho": rho}}
    engine, *_ = dsd.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                config=config, loss_fn=loss_fn)
    return engine


def _weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return [p.detach().float().clone() for p in params]


def _run(stage: int, batches, *, plain: bool, rho: float = 0.05, bad: int | None = None) -> dict:
    engine = _engine(stage, rho, CE if plain or bad is None else _InfAt(2 * bad), batches[0][0].shape[0])
    start, scales = _weights(engine), []
    for i, (x, y) in enumerate(batches):
        x = x.to(engine.device).half()
        y = y.to(engine.device)
        if plain:
            if i == bad:
                x = x.clone().fill_(float("inf"))
            loss = CE(engine(x), y).mean()
            engine.backward(loss.float() * engine.optimizer.loss_scale if stage == 0 else loss)
            engine.step()
        else:
            engine.train_step((x, y))
        scales.append(float(engine.optimizer.loss_scale))
    w = _weights(engine)
    return dict(weights=w, scales=scales, skipped=int(engine.skipped_steps),
                finite=all(torch.isfinite(t).all() for t in w),
                moved=any(not torch.equal(a, b) for a, b in zip(start, w)))


def _stage(stage: int, batches) -> dict:
    plain, rho0 = _run(stage, batches, plain=True), _run(stage, batches, plain=False, rho=0.0)
    plain_bad, sam_bad = _run(stage, batches, plain=True, bad=3), _run(stage, batches, plain=False, bad=3)
    bit_equal = all(torch.equal(a, b) for a, b in zip(plain["weights"], rho0["weights"]))
    out = dict(rho0_bit_equal=bit_equal, scales=plain["scales"], rho0_scales=rho0["scales"],
               skipped=(plain["skipped"], rho0["skipped"]), bad_scales=(plain_bad["scales"], sam_bad["scales"]),
               bad_skipped=(plain_bad["skipped"], sam_bad["skipped"]), sam_finite=sam_bad["finite"],
               sam_moved=sam_bad["moved"])
    out["ok"] = bool(bit_equal and plain["scales"] == rho0["scales"] and plain["skipped"] == rho0["skipped"]
                     and plain_bad["scales"] == sam_bad["scales"] and plain_bad["skipped"] == sam_bad["skipped"]
                     and sam_bad["finite"] and sam_bad["moved"])
    return out


def run(dry_run: bool) -> dict:
    """ZeRO 0-3 on one process (world size 1); returns the section's JSON."""
    opts = DRY if dry_run else FULL
    cuda = torch.cuda.is_available() and not dry_run
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
        from deepspeed.accelerator import get_accelerator

        type(get_accelerator()).is_fp16_supported = lambda self: True  # see the module docstring
    with world_of_one("cuda" if cuda else "cpu"):
        gen = torch.Generator().manual_seed(1)
        size, n = opts["image_size"], opts["batch_size"]
        batches = [(torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen))
                   for _ in range(opts["steps"])]
        stages = {str(s): _stage(s, batches) for s in (0, 1, 2, 3)}
    return dict(section="deepspeed_fp16", device=torch.cuda.get_device_name(0) if cuda else "cpu", dry_run=dry_run,
                options=opts, stages=stages, ok=all(s["ok"] for s in stages.values()))


def main(argv: list[str] | None = None) -> int:
    return section_main("deepspeed_fp16", __doc__, run, "stages", argv)


if __name__ == "__main__":
    sys.exit(main())
