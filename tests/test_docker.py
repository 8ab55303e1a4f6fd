"""docker/Dockerfile, checked statically (it cannot be built here): it parses, and its pins are
the project's (pyproject.toml extras, the Makefile's torch pins)."""

from __future__ import annotations

import os
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = open(os.path.join(REPO, "docker", "Dockerfile")).read()
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word, rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


def _args() -> dict[str, str]:
    """Build arguments and their defaults (an ``ARG NAME`` re-declared after FROM keeps its default)."""
    out: dict[str, str] = {}
    for word, rest in _instructions():
        if word == "ARG":
            name, default = re.match(r"(\w+)(?:=(.*))?$", rest).groups()
            out[name] = default if default is not None else out.get(name)
    return out


def test_dockerfile_parses():
    found = _instructions()
    assert all(word in INSTRUCTIONS for word, _ in found), [w for w, _ in found if w not in INSTRUCTIONS]
    words = [w for w, _ in found]
    assert set(words[: words.index("FROM")]) <= {"ARG"}  # only ARGs before FROM
    defined = {name for name in _args()} | {m.split("=")[0] for w, rest in found if w == "ENV" for m in rest.split()}
    used = set(re.findall(r"\$\{(\w+)\}", " ".join(rest for _, rest in found)))
    assert used <= defined, f"undefined build variables: {used - defined}"
    for word, rest in found:
        if word in ("COPY", "ADD"):
            for source in rest.split()[:-1]:
                assert os.path.exists(os.path.join(REPO, source)), f"{word} {source}: not in the repository"


def test_pins_match_pyproject_and_makefile():
    project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]
    extras = project["optional-dependencies"]
    args = _args()
    assert f"deepspeed=={args['DEEPSPEED_VERSION']}" in extras["deepspeed"]
    assert args["DALI_PACKAGE"] in extras["dali"]
    assert "mpi4py" in extras["mpi"] and "mpi4py" in open(os.path.join(REPO, "docker", "Dockerfile")).read()
    makefile = open(os.path.join(REPO, "Makefile")).read()
    pins = dict(re.findall(r"(torch|torchvision)==([\w.]+)", re.search(r"TORCH_PINS\s*:?=(.*)", makefile).group(1)))
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (pins["torch"], pins["torchvision"])
    assert args["BASE_IMAGE"].startswith("pytorch/pytorch:${TORCH_VERSION}-")  # the base's torch is the pin
    cuda = re.match(r"cuda(\d+)\.(\d+)", args["CUDA_TAG"]).groups()
    assert args["DALI_PACKAGE"] == f"nvidia-dali-cuda{cuda[0]}{cuda[1]}"  # DALI built for the base's CUDA
    minimum = {re.split(r"[<>=!~ ]", d)[0]: d for d in project["dependencies"]}
    assert re.search(r">=\s*([\d.]+)", minimum["torch"]) and tuple(map(int, pins["torch"].split(".")[:2])) >= (2, 3)


def test_docker_readme_explains_build_and_multinode():
    text = open(os.path.join(REPO, "docker", "README.md")).read()
    for word in ("docker build -f docker/Dockerfile", "--network=host", "NNODES", "RDZV_ENDPOINT", "mpirun"):
        assert word in text
