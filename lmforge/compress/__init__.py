"""Making trained models smaller and faster: weight quantization (`quantize.py`) and magnitude pruning (`prune.py`).

Both read a run folder and write a new one that every lmforge command loads like any other.
"""
