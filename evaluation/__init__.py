"""Measuring whether an offset helps: the authors' scorers, the paired A/B statistics and their folder protocol.
Pure torch / numpy (transformers for the CLIP scorers); never imports ComfyUI."""
