"""The checks `tools/gpu_check.py` runs: common (context, synthetic pack), clip_checks, model_checks, faiss_checks."""
