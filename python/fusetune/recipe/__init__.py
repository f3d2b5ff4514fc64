"""The `fusetune train` job, built on the library (api/, training/): config, data, the training loop,
the batch-size finder, the memory report, and train.run_train, which runs them in order."""
