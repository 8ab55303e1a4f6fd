"""Sections of the lent-GPU check that live beside ``benchmarks/gpu_check.py``."""
