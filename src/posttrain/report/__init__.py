"""Report layer: the report and the paired comparison of two models' responses."""
