"""Demo data: the Fashion-MNIST files (full or the bundled subset) and shard writers for tests and benchmarks."""
