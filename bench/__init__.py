"""`make bench`: side-by-side benchmarks; every figure is a ratio against a baseline in the same run."""
