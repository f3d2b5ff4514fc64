"""Library helpers for training: offloaded activation checkpointing, the hardware and backend probe."""
