"""A vision-language model: an image encoder and a projector into the language model's embedding space."""
