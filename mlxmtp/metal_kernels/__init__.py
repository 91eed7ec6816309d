"""Custom Metal kernels for the verify pass, each beside the pure-MLX reference path it must match (README.md)."""
