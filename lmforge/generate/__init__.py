"""Generation: token ids in, token ids out (engine.py is the decoding loop); text.py is the text edge."""
