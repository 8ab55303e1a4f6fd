"""dist-sam benchmarks: timing and accuracy scripts, run by hand or by `make bench` / `make study`.

``run`` is the sweep harness (``dist-sam bench``), ``study`` the m-sharpness accuracy study,
``bench_ddp`` a preset of the sweep, ``gpu_check`` the lent-GPU check. Tests never time anything;
these scripts do. See ``benchmarks/README.md``.
"""
