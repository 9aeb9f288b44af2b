"""Latency measurement: a declared protocol, runtimes, interleaved comparisons, a cache, the CI gate."""
