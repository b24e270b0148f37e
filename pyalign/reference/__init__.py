"""Plain-PyTorch implementations of every pyalign operation: the test oracle."""
