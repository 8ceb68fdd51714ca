"""Data layer: examples and their splits, answer extraction, declines, synthetic charts, LRV and prepare."""
