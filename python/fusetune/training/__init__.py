"""Library helpers for training: offloaded activation checkpointing, padding-free packing, the hardware and
backend probe."""
