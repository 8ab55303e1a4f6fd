"""Step-directory checkpoints: manifest, atomic commit, keep-last-K, every kind of damage, a kill mid-write."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_sam.checkpoint import (MANIFEST, PAYLOAD, CheckpointError, DamagedCheckpointError, begin_checkpoint,
                                 commit_checkpoint, config_diff, describe_file, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, save_checkpoint, verify_checkpoint, write_file)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"optim": {"lr": 0.1}, "run": {"output_dir": "a"}, "sam": {"variant": "rwsam", "rho": 0.05}}


def _state(value: float = 1.0, config=CONFIG) -> dict:
    return {"model": {"w": torch.full((3,), value), "n": torch.tensor(2)}, "config": config, "rng": [{"pos": 1}]}


def test_layout_manifest_and_keep_last_k(tmp_path):
    for step in (2, 4, 6, 8):
        path = save_checkpoint(_state(step), str(tmp_path), step=step, keep_last=2)
        assert os.path.basename(path) == f"step_{step:09d}"
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_000000006", "step_000000008"]
    latest = latest_checkpoint(str(tmp_path))
    assert sorted(os.listdir(latest)) == [MANIFEST, PAYLOAD]
    manifest = json.load(open(os.path.join(latest, MANIFEST)))
    raw = open(os.path.join(latest, PAYLOAD), "rb").read()  # the record is the file's, computed here independently
    assert manifest["files"][PAYLOAD] == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert manifest["step"] == 8 and set(manifest["verify"]["required"]) == {"model", "config", "rng"}
    state = torch.load(os.path.join(latest, PAYLOAD), weights_only=True)  # plain weights_only payload
    assert torch.equal(state["model"]["w"], torch.full((3,), 8.0)) and state["config"] == CONFIG
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_same_step_saved_again_replaces_it(tmp_path):
    save_checkpoint(_state(1.0), str(tmp_path), step=3)
    save_checkpoint(_state(2.0), str(tmp_path), step=3)
    assert len(list_checkpoints(str(tmp_path))) == 1
    assert load_checkpoint(latest_checkpoint(str(tmp_path)))["model"]["w"][0] == 2.0


def test_several_writers_share_one_step_directory(tmp_path):
    """The shape of a sharded (DCP) writer: every rank writes files, one commits the manifest last."""
    staging = begin_checkpoint(str(tmp_path), 5)
    records = {f"shard_{r}.pt": write_file(staging, f"shard_{r}.pt", {"w": torch.full((2,), float(r))}) for r in range(2)}
    (open(os.path.join(staging, "extra.bin"), "wb")).write(b"x" * 10)
    records["extra.bin"] = describe_file(os.path.join(staging, "extra.bin"))
    assert list_checkpoints(str(tmp_path)) == []  # not visible before the commit
    path = commit_checkpoint(staging, str(tmp_path), 5, records, meta={"engine": "dcp"})
    assert verify_checkpoint(path)["meta"] == {"engine": "dcp"}
    with pytest.raises(DamagedCheckpointError, match="no state.pt payload"):
        load_checkpoint(path)  # loaded by its engine, not as one payload
    os.truncate(os.path.join(path, "shard_1.pt"), 5)
    with pytest.raises(DamagedCheckpointError, match="shard_1.pt.*truncated"):
        verify_checkpoint(path)


def _damage(path: str, kind: str) -> str:
    """Damage the checkpoint directory ``path``; return the cause the error must name."""
    payload, manifest = os.path.join(path, PAYLOAD), os.path.join(path, MANIFEST)
    if kind == "truncated":
        os.truncate(payload, os.path.getsize(payload) // 2)
        return "truncated"
    if kind == "bit_flip":
        data = bytearray(open(payload, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(payload, "wb").write(bytes(data))
        return "SHA-256 differs"
    if kind == "missing_payload":
        os.unlink(payload)
        return "missing"
    if kind == "no_manifest":
        os.unlink(manifest)
        return "no manifest.json"
    if kind == "bad_manifest":
        open(manifest, "w").write("{not json")
        return "unreadable"
    if kind == "unreadable":  # garbage of the right size and checksum: only torch.load can tell
        garbage = bytes(i % 251 for i in range(os.path.getsize(payload)))  # not a zip, not a pickle
        open(payload, "wb").write(garbage)
        _rewrite_record(path, garbage)
        return "torch.load failed"
    raise AssertionError(kind)


def _rewrite_record(path: str, data: bytes) -> None:
    file = os.path.join(path, MANIFEST)
    manifest = json.load(open(file))
    manifest["files"][PAYLOAD] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(manifest, open(file, "w"))


@pytest.mark.parametrize("kind", ["truncated", "bit_flip", "missing_payload", "no_manifest", "bad_manifest", "unreadable"])
def test_each_damage_is_a_damaged_checkpoint_error_naming_file_and_cause(tmp_path, kind):
    path = save_checkpoint(_state(), str(tmp_path), step=1)
    cause = _damage(path, kind)
    with pytest.raises(DamagedCheckpointError) as err:
        load_checkpoint(path)
    assert cause in str(err.value) and str(tmp_path) in str(err.value)
    e = err.value  # no chained torch.load traceback is shown under it
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def test_missing_key_and_non_finite_weights_are_damage(tmp_path):
    path = save_checkpoint(_state(), str(tmp_path / "a"), step=1)
    good = torch.load(os.path.join(path, PAYLOAD), weights_only=True)
    del good["rng"]  # a payload without a key the manifest requires, with a matching record
    torch.save(good, os.path.join(path, PAYLOAD))
    _rewrite_record(path, open(os.path.join(path, PAYLOAD), "rb").read())
    with pytest.raises(DamagedCheckpointError, match=r"missing key\(s\) \['rng'\]"):
        load_checkpoint(path)
    state = _state()
    state["model"]["w"][1] = float("nan")
    path = save_checkpoint(state, str(tmp_path / "b"), step=1)
    with pytest.raises(DamagedCheckpointError, match="non-finite.*'w'"):
        load_checkpoint(path)


def test_another_config_is_refused_not_damage(tmp_path):
    path = save_checkpoint(_state(), str(tmp_path), step=1)
    other = {**CONFIG, "optim": {"lr": 0.2}, "run": {"output_dir": "b"}}
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.1 -> 0\.2") as err:
        load_checkpoint(path, config=other)
    assert not isinstance(err.value, DamagedCheckpointError)
    load_checkpoint(path, config={**CONFIG, "run": {"output_dir": "b"}}, ignore=["run.output_dir"])
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, ignore=["x.*"]) == ["a.c: '<unset>' -> 2"]
    assert config_diff({"checkpoint": {"dir": "x"}}, {"checkpoint": {"dir": "y"}}, ignore=["checkpoint.*"]) == []


def test_refuses_pickled_objects(tmp_path):
    path = save_checkpoint(_state(), str(tmp_path), step=1)
    torch.save({"model": {}, "evil": object()}, os.path.join(path, PAYLOAD))
    _rewrite_record(path, open(os.path.join(path, PAYLOAD), "rb").read())
    with pytest.raises(DamagedCheckpointError, match="[Ww]eights only"):
        load_checkpoint(path)


_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from dist_sam import checkpoint
    directory = sys.argv[1]
    checkpoint.save_checkpoint({"model": {"w": torch.ones(4)}}, directory, step=1)
    def stall(fd):  # the payload is written but not yet synced, no manifest, no rename: kill here
        print("writing", flush=True)
        time.sleep(120)
    checkpoint.os.fsync = stall
    checkpoint.save_checkpoint({"model": {"w": torch.zeros(1_000_000)}}, directory, step=2)
""")


def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [n for n in os.listdir(tmp_path) if n.endswith(".partial")]  # mid-write
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_000000001"]
    assert torch.equal(load_checkpoint(latest_checkpoint(str(tmp_path)))["model"]["w"], torch.ones(4))
    save_checkpoint({"model": {"w": torch.ones(1)}}, str(tmp_path), step=3)  # the next save cleans the stray one
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
