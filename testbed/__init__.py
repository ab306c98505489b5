"""What the tests and the benchmarks both use: images made in code, and HTTP servers on 127.0.0.1."""
