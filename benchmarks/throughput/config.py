"""The sweep's settings: ``BenchConfig`` (validated), its YAML loader, and the variant names.

``parse_variant`` turns a name (``sgd``, ``sam-local``, ``msam-b/4``, ``rwsam-fd``, ...) into how
that variant steps (:class:`Variant`). Used by ``harness`` (which re-exports these names) and
``report`` of ``benchmarks.throughput``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..common.output import RESULTS_DIR

__all__ = ["DEFAULT_VARIANTS", "RESULTS_DIR", "BenchConfig", "Variant", "parse_variant", "load_config"]

DEFAULT_VARIANTS = ("sgd", "sam-local", "sam-global", "usam", "asam", "msam-b", "msam-b/2", "msam-b/4",
                    "msam-b/8", "rwsam-fd", "rwsam-last_layer")


@dataclasses.dataclass(kw_only=True)
class BenchConfig:
    """One sweep. YAML keys are these field names (``benchmarks/configs/*.yaml``).

    Attributes:
        name: output file stem, ``<out>/<name>.json``.
        model: ``small_cnn``, ``resnet18``, ``resnet50`` (``dist_sam.train.models``) or ``resnet18_cifar``.
        image_size, num_classes: synthetic input side and classes.
        batch_size: per worker (``b``); m-SAM variants ``msam-b/k`` use ``m = b / k``.
        world_sizes: process counts to run, each a separate set of processes.
        threads: torch intra-op threads per process (recorded in the results).
        variants: names accepted by :func:`parse_variant`.
        warmup: untimed steps per variant (the first one measures peak memory).
        steps: timed steps per variant (at least 20 unless ``quick``).
        steps_per_round: consecutive steps of one variant before the next variant's turn.
        rho, asam_rho, lam, mu: SAM radius, ASAM radius, RW-SAM temperature and FD step.
        lr, momentum, weight_decay: the base SGD (``lr=0`` keeps the weights fixed).
        device: ``cpu``, ``cuda`` or ``auto``.
        autocast_dtype: ``null`` or ``bfloat16``/``float16``.
        channels_last: model and inputs in ``torch.channels_last``.
        quick: a smoke run (allows fewer than 20 timed steps, marked in the results).
        timeout_s: per world size, for the spawned processes.
        compile: time ``DDP(torch.compile(model, mode=compile_mode, backend=compile_backend))``
            (``torch.compile(model)`` without DDP); warm-up steps include the compilation.
    """

    name: str = "bench"
    model: str = "resnet18"
    image_size: int = 32
    num_classes: int = 10
    batch_size: int = 32
    world_sizes: tuple[int, ...] = (1, 2)
    threads: int = 1
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    warmup: int = 2
    steps: int = 20
    steps_per_round: int = 2
    rho: float = 0.05
    asam_rho: float = 0.5
    lam: float = 0.5
    mu: float = 1e-4
    lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "cpu"
    autocast_dtype: str | None = None
    channels_last: bool = False
    quick: bool = False
    timeout_s: float = 3600.0
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        self.world_sizes, self.variants = tuple(self.world_sizes), tuple(self.variants)
        for key in ("image_size", "num_classes", "batch_size", "threads", "warmup", "steps", "steps_per_round"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchConfig.{key} must be an integer >= 1, got {value!r}")
        if not self.world_sizes or any(not isinstance(n, int) or n < 1 for n in self.world_sizes):
            raise ValueError(f"BenchConfig.world_sizes must be integers >= 1, got {self.world_sizes!r}")
        if self.steps < 20 and not self.quick:
            raise ValueError(f"BenchConfig.steps must be >= 20 (median of at least 20 steps), got {self.steps}; "
                             "set quick: true for a smoke run")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"BenchConfig.device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"BenchConfig.autocast_dtype must be null, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"BenchConfig.compile must be true or false, got {self.compile!r}")
        if "sgd" not in self.variants:
            raise ValueError("BenchConfig.variants must include 'sgd': every ratio is against it")
        for name in self.variants:
            parse_variant(name, self.batch_size, 1, self)  # raises ValueError on a bad name or m

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one variant steps: ``optimizer=None`` is plain SGD; ``m`` is the paper's m for it."""

    name: str
    optimizer: str | None
    ascent: str = "local"
    micro_batch_size: int | None = None
    m: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    micro_impl: str = "loop"
    compiled: bool = False  # ``<name>+compiled``: on a torch.compile'd twin of the model, same run


def parse_variant(name: str, b: int, world_size: int, cfg: BenchConfig) -> Variant:
    """``sgd``, ``sam-local``, ``sam-global``, ``usam``, ``asam``, ``msam-b[/k]``, ``rwsam-<estimator>``;
    ``msam-b[/k]-vmap`` is m-SAM with ``micro_impl="vmap"`` (batched, ``dist_sam.optim.batched``);
    ``<name>+compiled`` is that variant on a ``torch.compile``'d twin of the model in the same run
    (compiled against eager, interleaved; not with ``compile: true``, which compiles every variant)."""
    if name.endswith("+compiled"):
        if cfg.compile:
            raise ValueError(f"variant {name!r}: '+compiled' runs beside eager variants; with compile: true every variant is compiled")
        return dataclasses.replace(parse_variant(name[:-len("+compiled")], b, world_size, cfg), name=name, compiled=True)
    sam = (("rho", cfg.rho),)
    if name == "sgd":
        return Variant(name, None)
    if name == "sgd+reuse":  # LookSAM's off-step floor: SGD plus one norm and one axpy (harness.reuse_floor_)
        return Variant(name, None, options=(("reuse_alpha", 0.3),))
    if name in ("sam-local", "sam-global"):
        ascent = name.split("-")[1]
        return Variant(name, "sam", ascent, m=b if ascent == "local" else world_size * b, options=sam)
    if name == "usam":
        return Variant(name, "usam", m=b, options=sam)
    if name == "asam":
        return Variant(name, "asam", m=b, options=(("rho", cfg.asam_rho),))
    if name.startswith("msam-b") and name.endswith("-vmap"):
        return dataclasses.replace(parse_variant(name[:-len("-vmap")], b, world_size, cfg), name=name, micro_impl="vmap")
    if name.startswith("msam-b"):
        k = name[len("msam-b"):]
        k = int(k[1:]) if k.startswith("/") and k[1:].isdigit() else (1 if k == "" else 0)
        if k < 1 or b % k:
            raise ValueError(f"variant {name!r}: expected msam-b or msam-b/k with k dividing batch_size {b}")
        return Variant(name, "sam", "micro", micro_batch_size=b // k, m=b // k, options=sam)
    if name.startswith("looksam-"):
        return _looksam(name, b, sam)
    if name.startswith("rwsam-"):
        estimator = name[len("rwsam-"):]
        if estimator not in ("fd", "last_layer", "exact"):
            raise ValueError(f"variant {name!r}: the RW-SAM estimator must be fd, last_layer or exact")
        opts = sam + (("estimator", estimator), ("lam", cfg.lam)) + ((("mu", cfg.mu),) if estimator == "fd" else ())
        return Variant(name, "rwsam", m=b, options=opts)
    raise ValueError(f"unknown variant {name!r}; accepted: {DEFAULT_VARIANTS} (msam-b/k for any k dividing b, msam-b/k-vmap "
                     "batched), rwsam-exact, looksam-k<K>, looksam-b/<j>-k<K> (look-m-SAM), looksam-off, sgd+reuse (its floor)")


#: ``looksam-off``: a look step once (in the warm-up), then only off steps: the cost of an off step.
OFF_ONLY_K = 10**9


def _looksam(name: str, b: int, sam: tuple) -> Variant:
    """``looksam-k<K>`` (local look steps every K steps), ``looksam-b/<j>-k<K>`` (look-m-SAM, m = b/j)
    and ``looksam-off``."""
    rest = name[len("looksam-"):]
    if rest == "off":
        return Variant(name, "looksam", m=b, options=sam + (("k", OFF_ONLY_K), ("warmup", 0)))
    micro, _, k = rest.rpartition("-")
    j = micro[2:] if micro.startswith("b/") else ""
    if not (k.startswith("k") and k[1:].isdigit() and int(k[1:]) >= 1) or micro and not (j.isdigit() and int(j) >= 1
                                                                                          and b % int(j) == 0):
        raise ValueError(f"variant {name!r}: expected looksam-k<K>, looksam-b/<j>-k<K> (j dividing batch_size {b}) "
                         "or looksam-off")
    options = sam + (("k", int(k[1:])), ("warmup", 0))
    if micro:
        return Variant(name, "looksam", "micro", micro_batch_size=b // int(j), m=b // int(j), options=options)
    return Variant(name, "looksam", m=b, options=options)


def load_config(path: str | None, **overrides: Any) -> BenchConfig:
    """``BenchConfig`` from a YAML file (or the defaults), with non-``None`` overrides applied."""
    import yaml

    values: dict[str, Any] = {}
    if path:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(BenchConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; accepted: {[f.name for f in dataclasses.fields(BenchConfig)]}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**values)
