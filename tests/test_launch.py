"""The launchers: two torchrun "nodes" on localhost (c10d), mpiexec with the mpi4py bootstrap,
DeepSpeed routing, and the launch scripts themselves."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from dist_sam.train import cli
from test_train_run import REPO, TRAIN, make_tiny_dataset, tiny_config, torchrun, worker_env

BIN = os.path.dirname(sys.executable)
LAUNCH = os.path.join(REPO, "launch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return str(root), make_tiny_dataset(str(root / "data"))


def _summary(out: str) -> dict:
    return json.load(open(os.path.join(out, "summary.json")))


@pytest.mark.slow
def test_two_nodes_on_localhost_with_c10d_rendezvous(tiny):
    root, data = tiny
    out = os.path.join(root, "two_nodes")
    cfg = tiny_config(os.path.join(root, "two_nodes.yaml"), data, out, sam__variant="sam")
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = worker_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                         RUN_ID="two-nodes-test", MAX_RESTARTS="0", PATH=BIN + os.pathsep + os.environ["PATH"])
        procs.append(subprocess.Popen(["bash", os.path.join(LAUNCH, "torchrun.sh"), "--config", cfg, "run.stop_at_step=2"],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert summary["replicas_agree"] and len(summary["replica_weights_sha256"]) == 2  # both nodes, same weights


@pytest.mark.slow
def test_mpiexec_with_the_mpi4py_bootstrap(tiny):
    mpiexec = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install 'dist-sam[mpi]')")
    root, data = tiny
    out = os.path.join(root, "mpi")
    cfg = tiny_config(os.path.join(root, "mpi.yaml"), data, out, sam__variant="sam")
    env = worker_env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, TRAIN, "--launcher", "mpi", "--config", cfg,
                           "run.stop_at_step=2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["global_step"] == 2 and summary["replicas_agree"]


@pytest.mark.slow
def test_deepspeed_route(tiny, tmp_path):
    pytest.importorskip("deepspeed")
    root, data = tiny
    out = str(tmp_path / "ds")
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, out, run__epochs=1)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                              "sam": {"variant": "rwsam", "rho": 0.05, "ascent": "local", "lam": 0.5}}))
    torchrun(["--config", cfg, "--deepspeed", str(ds)], env=worker_env(DS_ACCELERATOR="cpu"))
    summary = _summary(out)
    assert summary["finished"] and summary["world_size"] == 2 and summary["global_step"] == 3
    assert os.path.isfile(os.path.join(out, "checkpoints", "latest"))  # DeepSpeed's checkpoint format


def test_deepspeed_config_checked_before_training(tiny, tmp_path, capsys):
    root, data = tiny
    cfg = tiny_config(str(tmp_path / "c.yaml"), data, str(tmp_path / "out"))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "sam": {"variant": "sam"}}))
    assert cli.main(["--config", cfg, "--deepspeed", str(ds)]) == 2
    assert "train_micro_batch_size_per_gpu=32" in capsys.readouterr().err
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "sam": {"variant": "sam", "ascent": "global"}}))
    assert cli.main(["--config", cfg, "--deepspeed", str(ds)]) == 2
    assert "zero_optimization.stage" in capsys.readouterr().err
    assert cli.main(["--config", cfg, "--deepspeed", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh", "slurm.sbatch"])
def test_launch_scripts_parse(script):
    path = os.path.join(LAUNCH, script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    assert os.access(path, os.X_OK)


def test_launch_scripts_say_what_the_issue_asks():
    torchrun_sh = open(os.path.join(LAUNCH, "torchrun.sh")).read()
    for word in ("NNODES", "NODE_RANK", "RDZV_ENDPOINT", "--rdzv_backend=c10d", "--max-restarts"):
        assert word in torchrun_sh
    assert "--launcher mpi" in open(os.path.join(LAUNCH, "mpirun.sh")).read()
    sbatch = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    for word in ("#SBATCH", "srun", "torchrun", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST"):
        assert word in sbatch
