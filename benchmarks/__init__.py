"""dist-sam benchmarks: timing and accuracy scripts, run by hand or by `make bench` / `make study`.

``run`` is the sweep's entry point (``dist-sam bench``) over ``config`` (settings, variant names),
``harness`` (the timing loop, the processes) and ``report`` (summaries, checks, files); ``study``
the m-sharpness accuracy study, ``bench_ddp`` a preset of the sweep, ``gpu_check`` the lent-GPU
check. Tests never time anything; these scripts do. See ``benchmarks/README.md``.
"""
