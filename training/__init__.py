"""Self-NPO training (truncated diffusion fine-tuning, TDFT). Pure torch: never imports ComfyUI."""
