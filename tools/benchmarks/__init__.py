"""The sections of tools/bench.py, one module each, and what they share (common.py, corpus.py, synthetic.py).

Imported by tools/bench.py, which puts the repository root and tools/ on sys.path first.
"""
