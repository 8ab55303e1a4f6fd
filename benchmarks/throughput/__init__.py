"""The throughput harness: step time, img/s, all-reduce calls/bytes and peak memory per SAM variant.

    make bench                                   # = python -m benchmarks.throughput --config benchmarks/throughput/configs/cpu.yaml
    python -m benchmarks.throughput.floor ...    # m-SAM against its sequential floor
    python -m benchmarks.throughput.fsdp         # FSDP2 at world size 2
    python -m benchmarks.throughput.ddp          # SAM-local / SGD at world size 2 (a preset of the sweep)
    python -m benchmarks.throughput.rwsam        # RW-SAM's overhead over SAM
    python -m benchmarks.throughput.data         # DALI against torchvision's loader

``run`` (the sweep's entry point) over ``config`` (settings, variant names), ``harness`` (the timing
loop, the processes) and ``report`` (summaries, checks, files) and ``plots``.
"""
