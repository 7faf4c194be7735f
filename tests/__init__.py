"""The test suite: a package, so that an installed top-level `tests` package (torch-fidelity ships one)
cannot shadow it."""
