"""The house rules of the code layout, read from the source (README "How the code is laid out").

* Imports only run down the layers of ``dist_sam`` (function-level imports included).
* The algorithm (``optim/``, ``core/``) never imports ``torch.distributed``; the engines
  (``distributed/``) reach the algorithm only through the step core's interface.
* Only the engines resolve a wrapped model: nothing else imports ``compiled.py`` or unwraps.
* No Python file in ``dist_sam/`` or ``benchmarks/`` exceeds 300 lines.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Each part of ``dist_sam`` and its layer: a part imports only parts of a lower layer (or itself).
LAYERS = {
    "bn": 0, "compiled": 0,
    "optim": 1,                 # the algorithm: rules, optimizers, estimators
    "core": 2,                  # the one step loop and the engine interface
    "distributed": 3,           # the engines (DDP, FSDP2, DeepSpeed), collectives, launch
    "step": 4, "diagnostics": 4, "data": 4, "checkpoint_load": 4,
    "checkpoint": 5,            # writes checkpoints; checkpoint_load reads and verifies them
    "config": 5,                # SamConfig: names the ascent modes of step
    "deepspeed": 6,             # initialize(): a config's sam section on a DeepSpeed engine
    "__init__": 7, "train": 7,  # the trainer; the package's public face
    "cli": 8, "integrations": 8,
}
TORCH_DISTRIBUTED = ("torch.distributed", "torch.nn.parallel")


def _files(folder: str) -> list[pathlib.Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _part(module: str) -> str:
    """``dist_sam.optim.sam`` -> ``optim``; ``dist_sam`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with its line."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {(a.name, node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import collectives` imports the submodule
                sub = ROOT.joinpath(*target.split("."), alias.name)
                found.add((f"{target}.{alias.name}" if sub.with_suffix(".py").exists() or sub.is_dir() else target,
                           node.lineno))
    return sorted(found)


def _where(path: pathlib.Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in (ROOT / "dist_sam").iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts <= set(LAYERS), f"give these parts of dist_sam a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_imports_run_down_the_layers():
    upward = []
    for path in _files("dist_sam"):
        here = _part(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for target, line in _imports(path):
            if target.split(".")[0] != "dist_sam":
                continue
            there = _part(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{_where(path, line)}: {here} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
    assert not upward, "imports that run back up a layer:\n" + "\n".join(upward)


def test_the_algorithm_never_imports_torch_distributed():
    found = [f"{_where(p, line)}: {t}" for p in [*_files("dist_sam/optim"), *_files("dist_sam/core")]
             for t, line in _imports(p) if t.startswith(TORCH_DISTRIBUTED)]
    assert not found, found


def test_engines_reach_the_algorithm_through_the_core():
    found = [f"{_where(p, line)}: {t}" for p in _files("dist_sam/distributed") for t, line in _imports(p)
             if t.startswith("dist_sam.optim")]
    assert not found, found


def test_only_the_engines_resolve_wrapped_models():
    """``compiled.py`` and DDP's ``.module`` are seen through in ``distributed/`` (and the engine
    interface's ``capture``) only; the algorithm gets the modules it needs from the engine."""
    allowed = {ROOT / "dist_sam/core/engine.py"} | set(_files("dist_sam/distributed"))
    found = [f"{_where(p, line)}: {t}" for p in _files("dist_sam") if p not in allowed
             for t, line in _imports(p) if t.startswith("dist_sam.compiled")]
    assert not found, found
    for p in _files("dist_sam/optim"):
        text = p.read_text()
        for needle in ("strip_compiled", "_orig_mod", "unwrap(", "local_module"):
            assert needle not in text, f"{p.relative_to(ROOT)} unwraps a model ({needle})"


@pytest.mark.parametrize("folder", ["dist_sam", "benchmarks"])
def test_no_file_over_300_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in _files(folder) if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"split these at a natural seam: {long}"
