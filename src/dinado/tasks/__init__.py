"""Tasks built on the core: the demo's toy language (and later CommonGen, formality MT)."""
