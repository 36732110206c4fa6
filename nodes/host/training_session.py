"""A ComfyUI diffusion model put into training shape for one run: trainable Parameters, gradient
checkpointing, ComfyUI's training flag; restored bit-exactly afterwards."""

from __future__ import annotations

import torch

from ...npo_core.errors import NPOError


def _with_copied_inputs(fn):
    def run(*args, **kwargs):
        copy = lambda v: v.clone() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return fn(*[copy(a) for a in args], **{k: copy(v) for k, v in kwargs.items()})

    return run


def checkpoint_units(model: torch.nn.Module, unet: bool) -> list[torch.nn.Module]:
    """The modules gradient checkpointing wraps: a UNet's transformer and residual blocks; a DiT's
    transformer blocks (the members of its block lists: ``blocks``, ``joint_blocks``, ``double_blocks``,
    ``single_blocks``, ``transformer_blocks``, ``layers``, ...)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    if unet:
        return [m for m in model.modules() if isinstance(m, (BasicTransformerBlock, ResBlock))]
    out = []
    for _, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) and all(
            any(True for _ in b.parameters()) for b in child
        ):
            out.extend(child)
    return out


def _autograd_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor sharing ``t``'s memory. Inference tensors (what ComfyUI loads weights as, since
    nodes run under ``torch.inference_mode``) cannot be saved for backward; an alias made outside
    inference mode can, and costs no copy. Only for weights that are never written to."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


class TrainingSession:
    """Puts a loaded ComfyUI UNet into training shape and restores it exactly afterwards.

    Nodes run under ``torch.inference_mode``, so the model's Parameters are inference tensors that
    autograd can neither save nor version (even after ``.data`` is replaced). For the session every
    Parameter is replaced by a fresh normal Parameter: with ``copy_weights`` (``full`` mode, where these
    become the student) a copy of its values, ≈ one extra UNet in its own dtype; without (``lora`` mode,
    base weights frozen) an alias of the same memory, no copy. The original Parameter objects are never
    touched and are put back on exit, so the model is bit-identical afterwards. Mixed precision comes
    from autocast in ``training_denoiser``; gradient checkpointing wraps the transformer and residual
    blocks.
    """

    def __init__(
        self, unet: torch.nn.Module, gradient_checkpointing: bool, copy_weights: bool = True, is_unet: bool = True
    ) -> None:
        self.unet = unet
        self.is_unet = is_unet  # an SD UNet (comfy's UNetModel), not a DiT
        self.gradient_checkpointing = gradient_checkpointing
        self.copy_weights = copy_weights
        self._originals: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self._by_name: dict[str, torch.nn.Parameter] = {}
        self._forwards: list[torch.nn.Module] = []

    def __enter__(self):
        import comfy.model_management as mm

        # ComfyUI's own flag for training (its LoRA trainer sets it): model code then takes the differentiable
        # paths instead of fused inference kernels without a backward (comfy-kitchen's rope, for one)
        if self.copy_weights:  # refused before anything is replaced
            for name, p in self.unet.named_parameters():
                if type(p.data) is not torch.Tensor:
                    raise NPOError(
                        f"mode: full trains every weight, but '{name}' is quantized ({type(p.data).__name__}); use "
                        "mode lora on quantized checkpoints."
                    )
        self._was_training = getattr(mm, "in_training", None)
        if self._was_training is not None:
            mm.in_training = True
        with torch.inference_mode(False):
            for mod_name, module in self.unet.named_modules():
                for pname, old in list(module._parameters.items()):
                    if old is None:
                        continue
                    if type(old.data) is not torch.Tensor:  # a quantized weight (ComfyUI's QuantizedTensor)
                        continue  # its layer dequantizes into a fresh tensor each call: nothing to alias
                    data = old.data.clone() if self.copy_weights else _autograd_alias(old.data)
                    module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)
                    self._originals.append((module, pname, old))
                    self._by_name[f"{mod_name}.{pname}" if mod_name else pname] = old
        if self.gradient_checkpointing:
            self._checkpoint_blocks()
        return self

    def _checkpoint_blocks(self) -> None:
        import torch.utils.checkpoint as ckpt

        # DiT blocks update their inputs in place (Flux: ``img += ...``), which would change the tensors the
        # checkpoint saved for recomputation: they get copies of their tensor inputs instead
        copy_inputs = not self.is_unet
        for m in checkpoint_units(self.unet, self.is_unet):
            inner = m.forward

            def forward(*args, _inner=inner, _copy=copy_inputs, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                run = _with_copied_inputs(_inner) if _copy else _inner
                return ckpt.checkpoint(run, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            self._forwards.append(m)

    def full_params(self, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
        """All UNet weights as trainable Parameters in ``dtype`` (the student of full fine-tuning)."""
        if not self.copy_weights:
            raise RuntimeError("full_params needs a session with copy_weights=True (the weights get trained)")
        out = {}
        with torch.inference_mode(False):
            for name, p in self.unet.named_parameters():
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
                out[name] = p
        return out

    def original(self, name: str) -> torch.Tensor:
        return self._by_name[name].data

    def __exit__(self, *exc):
        import comfy.model_management as mm

        if self._was_training is not None:
            mm.in_training = self._was_training
        for m in self._forwards:
            del m.forward
        for module, pname, old in self._originals:
            module._parameters[pname] = old
        self._originals.clear()
        self._by_name.clear()
        return False
