"""Explainability: attention maps, the logit lens and input attributions for every model family, and their pictures.

probe.py turns a text and what to explain (a label, a continuation) into one padded batch and the scalar the
attributions explain; attention.py records attention probabilities; lens.py is the logit lens for decoders;
attribution.py holds integrated gradients, gradient x input and occlusion; render.py draws PNGs, the offline
HTML viewer and the terminal summary; explain.py ties them together for `lmforge explain` and `LM.explain`.
"""
