"""lmforge: build a complete language-model system end to end, Chinese first, on an ordinary CPU.

`lmforge.load(run_dir)` returns an `LM` (model + tokenizer) whose `.generate()` takes and returns text.
"""

from lmforge.lm import LM, load

__all__ = ["LM", "load"]
__version__ = "0.1.0"
