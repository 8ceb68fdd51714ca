"""Realscale layer: the end-to-end runner, stand-in models, pinning revisions, critic conversion."""
