"""The only code that knows ComfyUI internals, one module per concern:

- ``files``: the ``npo`` model folder, offset file names, save paths;
- ``model_facts``: a model's family record, latent layout, schedule kind, parameter names, weights, offset
  resolution;
- ``injection``: the offset on the negative rows of a UNet call; offsets read off weight patches;
- ``dual_model``: NPO models as the negative model of Dual Model CFG Guider;
- ``sampling``: Apply NPO, NPO Negative Model's weight patches, NPO CFG Guider;
- ``training_model``: the model being trained (schedule, denoiser, latents, LoRA targets, pool), built once a run;
- ``training_conds``: the prompts' model inputs, batched as ComfyUI batches conds;
- ``training_session``: the diffusion model in training shape (trainable Parameters, checkpointing), restored;
- ``training_run``: one Self-NPO run (plan, start data, train), shared by Self-NPO Train and the benchmarks;
- ``scorers``: the ``npo_scorers`` model folder, scorers under ComfyUI's model management, CLIP_VISION as a
  scorer's image tower;
- ``runtime``: logging, cancel, progress, out-of-memory errors.

Tested against ComfyUI v0.3.64, v0.14.1 and v0.33.0.
"""
