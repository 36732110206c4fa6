"""The pack's one error type: every bad input ends here, with a message that names the fix."""


class NPOError(ValueError):
    """Bad NPO input (file, key, shape, architecture, knob). The message names the input and the fix."""

    # ComfyUI shows an error's type as ``module.qualname`` unless the module is builtins; the pack's module is
    # named after its install path (``/…/custom_nodes/ComfyUI-NPO.npo_core.errors``), so the UI reads "NPOError"
    __module__ = "builtins"
