"""Rank discovery from torchrun, OpenMPI, PMI (MPICH/Intel MPI), PMIx and SLURM variables."""

from __future__ import annotations

import sys

import pytest

from dist_sam.distributed.env import DEFAULT_MASTER_PORT, DistEnv, discover, expand_nodelist
from dist_sam.distributed.launch import init_distributed


def test_single_process_without_variables():
    assert discover({}) == DistEnv()


def test_torchrun_variables():
    env = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node3", "MASTER_PORT": "29501",
                    "GROUP_RANK": "2", "NNODES": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port, env.num_nodes, env.node_rank) == ("node3", 29501, 4, 2)


def test_openmpi_variables():
    env = discover({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                    "OMPI_COMM_WORLD_NODE_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.source, env.node_rank) == (3, 4, 1, "openmpi", 1)
    assert env.master_addr is None  # the mpi4py bootstrap broadcasts it


def test_pmi_variables():
    env = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "9"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "pmi")
    assert discover({"PMIX_RANK": "2", "PMIX_SIZE": "3"}).source == "pmix"


def test_slurm_variables_and_nodelist():
    env = discover({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                    "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (9, 16, 1, "slurm")
    assert (env.master_addr, env.master_port, env.num_nodes, env.node_rank) == ("gpu007", DEFAULT_MASTER_PORT, 2, 1)


def test_precedence_torchrun_over_mpi_over_slurm():
    both = {"RANK": "0", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
            "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    assert discover(both).source == "torchrun"
    del both["RANK"]
    assert discover(both).source == "openmpi"  # torchrun needs both of its variables


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07],login", ["gpu01", "gpu02", "gpu03", "gpu07", "login"]),
    ("a[8-10]-ib", ["a8-ib", "a9-ib", "a10-ib"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("env, match", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an integer"),
    ({"PMI_RANK": "2", "PMI_SIZE": "2"}, r"PMI_RANK=2 is outside \[0, PMI_SIZE=2\)"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[01-"}, "malformed"),
])
def test_bad_variables_raise(env, match):
    with pytest.raises(ValueError, match=match):
        discover(env)


def test_mpi_launcher_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'dist-sam\[mpi\]'"):
        init_distributed("mpi")


def test_unknown_launcher_and_missing_rendezvous(monkeypatch):
    with pytest.raises(ValueError, match="launcher"):
        init_distributed("pdsh")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(ValueError, match="--launcher mpi"):
        init_distributed("env")


class _FakeComm:
    """``MPI.COMM_WORLD`` as rank ``rank`` sees it; ``bcast`` returns rank 0's value."""

    def __init__(self, rank, size, root_value):
        self.rank, self.size, self.root_value, self.sent = rank, size, root_value, None

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        return _FakeComm(self.rank % 2, 2, None)

    def bcast(self, value, root=0):
        self.sent = value
        return value if self.rank == root else self.root_value


def _fake_mpi(monkeypatch, comm):
    import types

    mpi = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=1)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


def test_mpi_bootstrap_openmpi_rank_receives_rank0_address(monkeypatch):
    from dist_sam.distributed.launch import mpi_bootstrap

    _fake_mpi(monkeypatch, _FakeComm(3, 4, ("10.0.0.7", 40123)))
    environ = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    env = mpi_bootstrap(environ)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "10.0.0.7", 40123)
    assert environ["MASTER_ADDR"] == "10.0.0.7" and environ["MASTER_PORT"] == "40123" and environ["RANK"] == "3"


def test_mpi_bootstrap_rank0_broadcasts_its_address_and_port(monkeypatch):
    from dist_sam.distributed.launch import mpi_bootstrap

    comm = _FakeComm(0, 2, None)
    _fake_mpi(monkeypatch, comm)
    environ = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MASTER_PORT": "29555"}
    env = mpi_bootstrap(environ)
    assert comm.sent[1] == 29555 and isinstance(comm.sent[0], str) and comm.sent[0]
    assert (env.rank, env.world_size, env.master_port, environ["WORLD_SIZE"]) == (0, 2, 29555, "2")


def test_mpi_bootstrap_refuses_variables_that_disagree_with_mpi(monkeypatch):
    from dist_sam.distributed.launch import mpi_bootstrap

    _fake_mpi(monkeypatch, _FakeComm(1, 2, ("h", 1)))
    with pytest.raises(RuntimeError, match="rank 0 of 2"):
        mpi_bootstrap({"PMI_RANK": "0", "PMI_SIZE": "2"})
