"""Benchmarks that ship with the package: `serve` is the load generator behind `hisa bench-serve`."""
