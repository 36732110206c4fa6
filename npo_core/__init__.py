"""Pure-torch core of the NPO pack: offsets, file formats, per-row injection. Never imports ComfyUI."""

from .errors import NPOError
from .offset import Dense, FullWeight, LowRank, NPOOffset

__all__ = ["NPOError", "NPOOffset", "LowRank", "Dense", "FullWeight"]
