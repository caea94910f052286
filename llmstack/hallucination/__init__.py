"""Hallucinations: teaching a model to say "I don't know" by interrogating it (Llama 3's recipe), measured."""
