"""Generation engine: token ids in, token ids out. Text lives at the edges (lmforge.lm)."""
