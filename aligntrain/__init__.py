"""aligntrain: SFT and DPO training on aligndata shards, with Accelerate."""

__version__ = "0.1.0"
