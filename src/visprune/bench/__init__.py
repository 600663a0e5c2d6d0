"""`visprune bench`: measured speed of every method against the dense model and the ideal (the same
pipeline fed the same token counts with trivial selection), following BENCHMARKS.md."""

from visprune.bench.runner import BenchConfig, run_benchmark

__all__ = ["BenchConfig", "run_benchmark"]
