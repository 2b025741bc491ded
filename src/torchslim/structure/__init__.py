"""What can be removed: groups of parameter slices, found by tracing a model (``structures``), and reports."""
