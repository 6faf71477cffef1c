"""dinado's benchmarks: scripts run by path (``python benchmarks/decode_overhead.py``) sharing benchmarks.common."""
