"""Hand-written model modules of the omni model (LLM, vision tower, audio tower, omni glue)."""
