"""The only code that knows ComfyUI internals, one module per concern:

- ``files``: the ``npo`` model folder, offset file names, save paths;
- ``model_facts``: a model's UNet, architecture, parameter names, weights, offset resolution;
- ``injection``: the offset on the negative rows of a UNet call; offsets read off weight patches;
- ``dual_model``: NPO models as the negative model of Dual Model CFG Guider;
- ``sampling``: Apply NPO, NPO Negative Model's weight patches, NPO CFG Guider;
- ``training_session``: Self-NPO training's schedule, denoiser, conds, pool and trainable weights;
- ``runtime``: logging, cancel, progress, out-of-memory errors.

Tested against ComfyUI v0.3.64, v0.14.1 and v0.33.0.
"""
