"""dist-sam benchmarks, one package per thing a user runs; tests never time anything, these do.

=====================  ==============================================================================
``throughput/``        ``make bench``: step time, img/s, all-reduce bytes and memory per variant; the
                       m-SAM floor, the FSDP2, DDP, RW-SAM and data-loader benches (``configs/``)
``study/``             ``make study``: accuracy studies on the digits task and their named grids
``gpu/``               ``benchmarks/gpu_check.sh``: every CUDA path in one run on a lent GPU
``common/``            what they share: spawned ranks, interleaved timing, JSON and figure output
``results/``           the measured JSON, markdown and PNG files the READMEs quote
=====================  ==============================================================================

See ``benchmarks/README.md``.
"""
