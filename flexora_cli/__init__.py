"""flexora-cli: Flexora layer selection for LoRA fine-tuning (arXiv 2408.10774)."""

__version__ = "0.1.0"
