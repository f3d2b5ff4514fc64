"""Plain-PyTorch versions of every op: the truth in tests and the CPU path. Imports only torch."""
