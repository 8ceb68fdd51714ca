"""Evaluate layer: generation, metrics, evaluating a model and the LLaVA-Critic judge."""
