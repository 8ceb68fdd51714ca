"""Experiments layer: grids of `dvc exp run` experiments and seed studies."""
