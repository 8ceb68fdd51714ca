"""Train layer: SFT training, checkpoints, adapter ensembles, preference pairs and DPO."""
