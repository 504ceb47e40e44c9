"""Capture: the model exported with torch.export as a Program (see dsv3c.frontend.exporter)."""
