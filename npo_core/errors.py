"""The pack's one error type: every bad input ends here, with a message that names the fix."""


class NPOError(ValueError):
    """Bad NPO input (file, key, shape, architecture, knob). The message names the input and the fix."""
