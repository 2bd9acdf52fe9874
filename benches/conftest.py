"""Benchmarks run the real kernels: the Triton interpreter is never enabled here."""
