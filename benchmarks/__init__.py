"""Speed and memory measurements, PyTorch references and profilers (run from the repository root:
`python -m benchmarks.<name>`; not installed with kdjax)."""
