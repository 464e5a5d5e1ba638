"""Hand-written GPU kernels (Triton) of the networks; imported lazily, only where Triton is installed."""
