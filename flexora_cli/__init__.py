"""flexora-cli: Flexora layer selection for LoRA fine-tuning (arXiv 2408.10774)."""

__version__ = "0.1.0"

import logging

# bitsandbytes' CPU backend warns on import when the optional `kernels` package is missing; its own
# fallback kernels work, so the line is only noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
