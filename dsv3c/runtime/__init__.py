"""The runtime: run compiled programs in one process or on torch.distributed ranks."""
