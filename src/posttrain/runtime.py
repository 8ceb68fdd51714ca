"""Process setup every stage shares: CPU threads, and quiet third-party progress bars."""

from __future__ import annotations

import os
import warnings


def setup(threads: int) -> str:
    """Set torch's CPU threads (0 keeps torch's default) and silence library noise; return the device name."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    return "cuda" if torch.cuda.is_available() else "cpu"
