"""Core layer: parameters, errors, atomic file I/O, process set-up and distributed helpers."""
