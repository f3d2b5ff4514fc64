"""Training helpers: hardware probe, memory reporting, the quick-start fine-tune."""
