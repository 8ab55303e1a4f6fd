"""World size 2 under torchrun (gloo, CPU): bit-exact resume, a worker SIGKILLed or sent SIGTERM mid-epoch,
ranks permuted across a restart, and resuming at world size 1 <-> 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dist_sam.checkpoint import load_checkpoint
from dist_sam.checkpoint_load import describe_file
from dist_sam.train import cli
from dist_sam.train.models import build_model
from dist_utils import free_port
from test_train_run import REPO, TRAIN, assert_bit_equal, make_tiny_dataset, tiny_config, torchrun, weights, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run: 2 epochs x 3 steps, RW-SAM (mu auto, per rank), local ascent."""
    root = tmp_path_factory.mktemp("dist")
    data = make_tiny_dataset(str(root / "data"))
    out = str(root / "straight")
    torchrun(["--config", tiny_config(str(root / "c.yaml"), data, out)])
    return data, out


def test_straight_run_summary(straight):
    summary = json.load(open(os.path.join(straight[1], "summary.json")))
    assert summary["world_size"] == 2 and summary["global_step"] == 6 and summary["replicas_agree"]
    comm = summary["comm_per_step"]
    assert comm["allreduce_calls_per_step"] == 1.0  # local ascent: one all-reduce per step, as SGD
    assert comm["allreduce_bytes_per_step"] > 0
    assert comm["stop_flag_allreduces_per_step"] == 1.0  # the stop agreement: one scalar, outside the hook
    assert summary["history"][-1]["num_samples"] == 20  # each val image counted once across ranks


def test_resume_is_bit_exact_world_size_2(straight, tmp_path):
    data, reference = straight
    out = str(tmp_path / "split")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out)
    torchrun(["--config", cfg, "run.stop_at_step=2"])  # k = 2, mid-epoch
    torchrun(["--config", cfg])  # N - k more steps
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["resumed_from"].endswith("step_000000002")
    assert_bit_equal(weights(reference), weights(out))


def test_worker_killed_mid_epoch_restarts_and_matches(straight, tmp_path):
    data, reference = straight
    out = str(tmp_path / "fault")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out)
    # rank 1 SIGKILLs itself after global step 5 (epoch 2, step 2 of 3) on the first attempt only;
    # the last checkpoint is step 4, so the restarted workers redo step 5.
    done = torchrun(["--config", cfg], extra=("--max-restarts=1", "--monitor-interval=0.5"),
                    env=worker_env(DIST_SAM_FAULT_AT_STEP="1:5"))
    assert "Signals.SIGKILL" in done.stderr or "SIGKILL" in done.stderr or "exitcode: -9" in done.stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["resumed_from"].endswith("step_000000004")
    assert_bit_equal(weights(reference), weights(out))


def _ckpt(output_dir: str, step: int) -> dict:
    return load_checkpoint(os.path.join(output_dir, "checkpoints", f"step_{step:09d}"))


def test_sigterm_to_one_rank_mid_epoch_checkpoints_that_step_and_the_restart_matches(straight, tmp_path):
    data, reference = straight
    out = str(tmp_path / "sigterm")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out)
    # rank 1 alone gets SIGTERM while step 5 (epoch 2, step 2 of 3) is in flight, first attempt only;
    # every rank finishes step 5, they agree to stop, rank 0 writes step 5 and both exit 75; torchrun restarts.
    done = torchrun(["--config", cfg], extra=("--max-restarts=1", "--monitor-interval=0.5"),
                    env=worker_env(DIST_SAM_SIGNAL_AT_STEP="1:5:SIGTERM"))
    assert "exitcode: 75" in done.stderr or "exitcode  : 75" in done.stderr, done.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["resumed_from"].endswith("step_000000005")  # no step lost or redone
    assert_bit_equal(weights(reference), weights(out))
    assert _ckpt(out, 6)["per_rank"][1]["rng"]["torch"].equal(_ckpt(reference, 6)["per_rank"][1]["rng"]["torch"])


def _direct(cfg: str, ranks: dict[int, int], *overrides: str) -> None:
    """Start the 2 workers without torchrun: ``ranks`` maps LOCAL_RANK -> RANK (c10d may permute them)."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, TRAIN, "--config", cfg, *overrides], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                                             LOCAL_RANK=str(local), RANK=str(rank)))
             for local, rank in ranks.items()]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)


def test_ranks_permuted_across_a_restart_resume_exactly(straight, tmp_path):
    data, reference = straight
    out = str(tmp_path / "permuted")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out)
    _direct(cfg, {0: 0, 1: 1}, "run.stop_at_step=2")
    _direct(cfg, {0: 1, 1: 0})  # the process on local slot 0 is now rank 1, and the other way round
    assert_bit_equal(weights(reference), weights(out))
    mine, theirs = _ckpt(out, 6)["per_rank"], _ckpt(reference, 6)["per_rank"]
    for rank in (0, 1):  # each rank took the saved state of its rank number, not of its slot
        assert mine[rank]["rng"]["torch"].equal(theirs[rank]["rng"]["torch"])
        assert mine[rank]["optimizer"] == theirs[rank]["optimizer"]
    assert not theirs[0]["rng"]["torch"].equal(theirs[1]["rng"]["torch"])  # the check can tell ranks apart


def _max_param_diff(a: dict, b: dict, names) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in names)


PARAM_TOLERANCE = 1e-5  # fp32 reduction order over 6 steps; measured: 0.0 on every path (printed with -s)


@pytest.fixture
def one_thread():
    """The in-process run at world size 1 uses one intra-op thread, as the torchrun workers do
    (OMP_NUM_THREADS=1): with 2 threads its convolutions reduce in another order, and 6 SAM steps
    amplify that to a max parameter difference of 4.4e-4 (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def _give_rank_its_own_mu(output_dir: str, step: int, rank: int, mu: float) -> None:
    """Rewrite ``rank``'s saved RW-SAM ``mu`` in checkpoint ``step`` (payload and manifest hash together).

    Both ranks' ``mu: auto`` calibrations pick the same candidate (1e-5) on every ISA tried here
    (AVX-512/AMX, AVX2, SSE4.1; errors differ only in the rounding), so whether the straight run's ranks
    differ was up to the machine. Giving rank 1 another ``mu`` makes the groups differ by construction."""
    path = os.path.join(output_dir, "checkpoints", f"step_{step:09d}")
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    state["per_rank"][rank]["optimizer"]["rwsam"]["mu"] = mu
    torch.save(state, os.path.join(path, "state.pt"))
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    manifest["files"]["state.pt"] = describe_file(os.path.join(path, "state.pt"))
    with open(os.path.join(path, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)


@pytest.mark.parametrize("path", ["2->1", "2->1->2"])
def test_world_size_change_keeps_samples_and_matches_up_to_reduction_order(straight, tmp_path, path, one_thread):
    """2 workers of 8 -> 1 worker of 16 in 2 chunks of 8 (m = 8) [-> 2 workers of 8 again], RW-SAM with
    ``mu: auto``: the two ranks hold different mu after step 2, and each group keeps its own."""
    data, _ = straight
    out, reference = str(tmp_path / "ws"), str(tmp_path / "reference")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out)
    torchrun(["--config", cfg, "run.stop_at_step=2"])
    own = _ckpt(out, 2)["per_rank"][0]["optimizer"]["rwsam"]["mu"]
    mus = [own, own * 10]  # rank 1 takes the next candidate up
    _give_rank_its_own_mu(out, 2, 1, mus[1])
    shutil.copytree(out, reference)
    torchrun(["--config", tiny_config(str(tmp_path / "r.yaml"), data, reference)])  # the reference: 2 workers on
    assert [r["optimizer"]["rwsam"]["mu"] for r in _ckpt(reference, 6)["per_rank"]] == mus
    if path == "2->1":
        assert cli.main(["--config", cfg]) == 0
        expect = {"world_size": 1, "batch_size": 16, "accumulation_steps": 2}
    else:
        assert cli.main(["--config", cfg, "run.stop_at_step=4"]) == 0
        merged = _ckpt(out, 4)["per_rank"][0]["optimizer"]["rwsam"]
        assert merged["group_mu"] == {0: mus[0], 1: mus[1]}
        torchrun(["--config", cfg])
        expect = {"world_size": 2, "batch_size": 8, "accumulation_steps": 1}
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["finished"] and summary["global_step"] == 6 and summary["batch_plan"] == expect
    a, b = weights(reference), weights(out)
    params = [n for n, _ in build_model("small_cnn", num_classes=4).named_parameters()]
    diff = _max_param_diff(a, b, params)
    print(f"\n{path}: max |w_straight - w_resized| over parameters = {diff:.3g}")
    assert diff <= PARAM_TOLERANCE


def test_world_size_change_refused_when_no_plan_keeps_the_group_size(straight, tmp_path):
    data, _ = straight
    out = str(tmp_path / "refuse")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out, data__batch_size=4)  # B = 8, m = 4 at 2 workers
    torchrun(["--config", cfg, "run.stop_at_step=1"])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", TRAIN,
                           "--config", cfg], env=worker_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode != 0
    assert "world size 3 cannot keep both" in done.stderr and "among 1, 2" in done.stderr
    assert "dist_sam/" not in done.stderr  # no traceback through our code on any rank (torchrun prints its own)


def _resume_with_damage_on_rank1(rank, world_size, tree, bad, explicit):
    """Rank 1 alone cannot read ``bad`` (a node with a stale or broken mount); both ranks decide."""
    from dist_sam.checkpoint import CheckpointError, DamagedCheckpointError
    from dist_sam.train import resume
    from dist_sam.train.config import TrainConfig

    if rank == 1:
        real = resume.load_checkpoint

        def load(path, **kwargs):
            if path == bad:
                raise DamagedCheckpointError(path, "unreadable on this node")
            return real(path, **kwargs)

        resume.load_checkpoint = load
    cfg = TrainConfig.from_dict({**tree, "checkpoint": {**tree["checkpoint"], "resume": bad if explicit else "auto"}})
    try:
        return resume.find_checkpoint(cfg)[0]
    except CheckpointError as err:
        return f"refused: {err}"


@pytest.mark.parametrize("explicit", [False, True])
def test_a_checkpoint_one_rank_cannot_read_is_skipped_or_refused_by_every_rank(tmp_path, explicit):
    from dist_sam.checkpoint import save_checkpoint
    from dist_sam.train.config import load_config, to_dict
    from dist_utils import run_distributed

    tree = to_dict(load_config(None, [f"data.root={tmp_path}", f"checkpoint.dir={tmp_path / 'ckpt'}"]))
    paths = [save_checkpoint({"model": {"w": torch.ones(2) * s}, "config": tree}, str(tmp_path / "ckpt"), step=s)
             for s in (1, 2)]
    got = run_distributed(_resume_with_damage_on_rank1, 2, args=(tree, paths[-1], explicit))
    if explicit:
        assert got[0] == got[1] and got[0].startswith("refused:") and "unreadable on this node (on rank 1)" in got[0]
    else:
        assert got == [paths[0], paths[0]]  # rank 0 could read the newest, but nobody takes it
