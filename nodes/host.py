"""The one module that knows ComfyUI internals (ModelPatcher, key maps, wrappers, samplers).

Everything version-sensitive lives here, so a ComfyUI update is a one-file fix. Tested against
v0.14.1 and kept compatible with v0.3.64. Parameter names passed to ``npo_core`` are relative to
the UNet (``input_blocks.1.1...weight``); ComfyUI's own keys carry ``diffusion_model.``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid

import comfy.lora
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import folder_paths
import torch

from ..npo_core import formats
from ..npo_core.errors import NPOError
from ..npo_core.inject import UNCOND, OffsetInjector, RowGate, chunk_row_mask, mask_to_slices
from ..npo_core.offset import Dense, FullWeight, LowRank, NPOOffset

log = logging.getLogger("comfyui-npo")
NPO_FOLDER = "npo"
PREFIX = "diffusion_model."


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def register_npo_folder() -> None:
    """Add ComfyUI's ``models/npo`` folder (created if missing) for offsets."""
    if NPO_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, NPO_FOLDER)
        folder_paths.folder_names_and_paths[NPO_FOLDER] = ([path], set(folder_paths.supported_pt_extensions))
    for p in folder_paths.folder_names_and_paths[NPO_FOLDER][0]:
        os.makedirs(p, exist_ok=True)


def offset_file_list() -> list[str]:
    """Files of the ``npo`` folder first, then ``loras`` (a name in both resolves to ``npo``)."""
    register_npo_folder()
    names = list(folder_paths.get_filename_list(NPO_FOLDER))
    seen = set(names)
    names += [n for n in folder_paths.get_filename_list("loras") if n not in seen]
    return names


def check_relative_name(name: str, input_name: str) -> None:
    """Refuse names that could leave their folder: absolute paths, drive letters, '..' parts."""
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise NPOError(
            f"{input_name}: '{name}' must be a file name inside its folder (no '..', no absolute path); "
            "put the file into the folder instead."
        )


def comfy_folders() -> list[str]:
    """Real paths of every folder ComfyUI keeps models and outputs in (extra_model_paths.yaml included)."""
    found = {folder_paths.models_dir, folder_paths.get_output_directory(), folder_paths.get_input_directory()}
    found.add(folder_paths.get_temp_directory())
    for kind, entry in folder_paths.folder_names_and_paths.items():
        if kind != "custom_nodes":  # code, not models
            found.update(entry[0])
    return sorted({os.path.realpath(f) for f in found})


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath((path, folder)) == folder
    except ValueError:  # other drive (Windows)
        return False


def check_inside_comfy_folders(path: str, input_name: str, name: str) -> None:
    """A file reached through a symlink must still lie inside one of ComfyUI's folders."""
    real = os.path.realpath(path)
    if not any(_inside(real, f) for f in comfy_folders()):
        raise NPOError(
            f"{input_name}: '{name}' links to {real}, outside ComfyUI's model and output folders; refused. "
            "Move the file into models/npo, or add its folder to extra_model_paths.yaml."
        )


def offset_file_path(name: str) -> str:
    register_npo_folder()
    check_relative_name(name, "offset_name")
    for folder in (NPO_FOLDER, "loras"):
        path = folder_paths.get_full_path(folder, name)
        if path:
            check_inside_comfy_folders(path, "offset_name", name)
            return path
    raise NPOError(
        f"offset_name: '{name}' is in neither models/npo nor models/loras. Put the file there and "
        "refresh (press R in the browser)."
    )


# ---------------------------------------------------------------------------------------------
# model facts
# ---------------------------------------------------------------------------------------------
def unet_of(mp) -> torch.nn.Module:
    return mp.model.diffusion_model


def model_arch(mp) -> str:
    return type(mp.model.model_config).__name__


def check_unet_model(mp, input_name: str = "model") -> None:
    """NPO offsets exist for SD1.x/SD2.x/SDXL-class UNets; refuse other architectures clearly."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if not isinstance(getattr(mp.model, "diffusion_model", None), UNetModel):
        raise NPOError(
            f"{input_name}: {model_arch(mp)} is not a UNet model (SD1.5/SD2/SDXL family). NPO offsets are "
            "defined for those UNets only; this architecture is not supported."
        )


def context_dim(mp) -> int | None:
    ctx = mp.model.model_config.unet_config.get("context_dim")
    return int(ctx) if ctx is not None else None


def param_shapes(mp) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in unet_of(mp).state_dict().items()}


def diffusers_to_ldm(mp) -> dict[str, str]:
    return comfy.utils.unet_to_diffusers(mp.model.model_config.unet_config)


def original_weight(mp, name: str) -> torch.Tensor:
    """The parameter without any patcher's weight patches (from the shared backup if patched now)."""
    key = PREFIX + name
    bk = mp.backup.get(key)
    if bk is not None:
        return bk.weight
    return comfy.utils.get_attr(mp.model, key)


def patched_weight(mp, name: str) -> torch.Tensor:
    """The parameter as ``mp`` would have it: original weight + ``mp``'s weight patches (fp32)."""
    key = PREFIX + name
    w = original_weight(mp, name).float().clone()
    patches = mp.patches.get(key)
    if not patches:
        return w
    return comfy.lora.calculate_weight(patches, w, key)


def resolve_for_model(offset: NPOOffset, mp, reference=None, input_name: str = "npo_offset") -> NPOOffset:
    """Map the offset's keys onto ``mp``'s UNet (error on any key that does not land) and turn full
    weights into δ = file − reference (``reference`` defaults to ``mp`` with its patches)."""
    check_unet_model(mp)
    try:
        out = formats.resolve(offset, param_shapes(mp), diffusers_to_ldm(mp), model_arch(mp), context_dim(mp))
    except NPOError as e:
        raise NPOError(f"{input_name}: {e}") from None
    if any(isinstance(e, FullWeight) for e in out.entries.values()):
        ref = reference if reference is not None else mp
        out = out.resolved_full_weights(lambda k: patched_weight(ref, k))
        out = out.replace(
            entries={
                k: e for k, e in out.entries.items() if not (isinstance(e, Dense) and not torch.count_nonzero(e.delta))
            }
        )
    return out


def model_weights(mp, names) -> dict[str, torch.Tensor]:
    return {n: patched_weight(mp, n) for n in names}


# ---------------------------------------------------------------------------------------------
# inference: per-row injection on the uncond rows
# ---------------------------------------------------------------------------------------------
class NegativeRowsOffset:
    """One Apply NPO: θ + strength·δ on the rows of the negative chunk, between two sigmas.

    The APPLY_MODEL wrapper finds those rows from ``cond_or_uncond``; in a Dual Model CFG Guider's
    negative pass every row is negative (see ``NegativePassModel``). The injector is attached to
    whichever UNet runs the call (the model, or a multi-GPU clone of it)."""

    def __init__(self, offset: NPOOffset, strength: float, sigma_hi: float, sigma_lo: float, full_range: bool):
        self.gate = RowGate()
        self.injector = OffsetInjector(offset, strength, self.gate)
        self.sigma_hi, self.sigma_lo, self.full_range = sigma_hi, sigma_lo, full_range

    def rows(self, mask: torch.Tensor, t: torch.Tensor) -> list[slice]:
        """``mask`` (negative rows) narrowed to the rows whose sigma lies in the range."""
        if not self.full_range:
            sig = t.detach().flatten().float().cpu()
            if sig.numel() == 1:
                sig = sig.expand(mask.shape[0])
            mask = mask & (sig <= self.sigma_hi * (1 + 1e-5)) & (sig >= self.sigma_lo * (1 - 1e-5))
        return mask_to_slices(mask)

    def active(self, unet: torch.nn.Module, rows: list[slice]):
        stack = contextlib.ExitStack()
        stack.enter_context(self.injector.attached_to(unet))
        stack.enter_context(self.gate.active(rows))
        return stack


def _unet_running(executor, fallback) -> torch.nn.Module:
    """The UNet of the BaseModel whose ``apply_model`` the APPLY_MODEL wrapper wraps (a multi-GPU clone
    has its own)."""
    base_model = getattr(executor, "class_obj", None)
    return getattr(base_model, "diffusion_model", None) or unet_of(fallback)


def _transformer_options(args: tuple, kwargs: dict) -> dict:
    topts = kwargs.get("transformer_options")
    if topts is None and len(args) >= 4:
        topts = args[3]
    return topts or {}


def apply_offset(model, offset: NPOOffset, strength: float, start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of ``model`` whose negative/uncond rows (``cond_or_uncond == 1``) run θ + strength·δ,
    between ``start_percent`` and ``end_percent`` of the schedule. One batched UNet call per step."""
    offset = resolve_for_model(offset, model)
    mp = model.clone()
    ms = mp.get_model_object("model_sampling")
    action = NegativeRowsOffset(
        offset,
        strength,
        float(ms.percent_to_sigma(start_percent)),
        float(ms.percent_to_sigma(end_percent)),
        start_percent <= 0.0 and end_percent >= 1.0,
    )

    def npo_apply_model(executor, x, t, *args, **kwargs):
        cond_or_uncond = _transformer_options(args, kwargs).get("cond_or_uncond")
        rows = action.rows(chunk_row_mask(cond_or_uncond, x.shape[0], UNCOND), t)
        if not rows:
            return executor(x, t, *args, **kwargs)
        with action.active(_unet_running(executor, mp), rows):
            return executor(x, t, *args, **kwargs)

    npo_apply_model.npo_action = action
    key = f"npo_offset_{uuid.uuid4().hex[:8]}"
    mp.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, npo_apply_model)
    mp.set_injections(
        key,
        [
            comfy.patcher_extension.PatcherInjection(
                inject=lambda patcher: action.injector.attach(unet_of(patcher)),
                eject=lambda patcher: action.injector.detach(unet_of(patcher)),
            )
        ],
    )
    _add_dual_model_support(mp)
    return mp


def npo_actions(mp) -> list[NegativeRowsOffset]:
    """The Apply NPO offsets ``mp`` carries, in the order they were applied."""
    wrappers = mp.get_all_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL)
    return [w.npo_action for w in wrappers if hasattr(w, "npo_action")]


# ---------------------------------------------------------------------------------------------
# a second MODEL for the negative pass (Dual Model CFG Guider, ComfyUI ≥ 0.33)
# ---------------------------------------------------------------------------------------------
DUAL_WRAPPER_KEY = "npo_dual_model"


class NegativePassModel:
    """Stands in for the BaseModel of a MODEL that a guider runs as its *negative* model only.

    Dual Model CFG Guider loads its negative model, then its positive model, and runs the negative
    pass on the negative model's BaseModel with the positive model's options. When both are clones of
    one module (NPO Negative Model or Apply NPO on the checkpoint the positive uses), the module then
    holds the positive's weights and the negative model's wrappers never run: plain CFG, silently.
    Every ``apply_model`` call here runs the negative model's weights instead: the difference between
    the weights loaded now and the negative model's own (exact low-rank for stacked LoRA patches,
    dense otherwise) and its Apply NPO offsets, injected on every row. All else is the BaseModel's."""

    def __init__(self, inner, patcher) -> None:
        self.__dict__["_inner"] = inner
        self.__dict__["_patcher"] = patcher
        self.__dict__["_diffs"] = {}  # loaded patches_uuid -> NegativeRowsOffset | None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def _weights_difference(self) -> NegativeRowsOffset | None:
        inner, patcher = self._inner, self._patcher
        loaded_uuid = getattr(inner, "current_weight_patches_uuid", None)
        if loaded_uuid is None or loaded_uuid == patcher.patches_uuid:
            return None  # the module holds the negative model's own weights (or no patches at all)
        if loaded_uuid not in self._diffs:
            loaded = getattr(inner, "current_patcher", None)
            if loaded is None or loaded.patches_uuid != loaded_uuid or not patcher.is_clone(loaded):
                raise NPOError(
                    "model_negative: its module holds the weights of another model that is not the one "
                    "sampling now, so NPO cannot tell which weights the negative pass would use. Use NPO "
                    "CFG Guider with npo_offset instead."
                )
            diff = patch_difference(loaded, patcher)
            self._diffs[loaded_uuid] = (
                NegativeRowsOffset(resolve_for_model(diff, patcher), 1.0, 0.0, 0.0, True) if diff.entries else None
            )
        return self._diffs[loaded_uuid]

    def apply_model(self, x, t, *args, **kwargs):
        actions = [a for a in [self._weights_difference(), *npo_actions(self._patcher)] if a is not None]
        unet = self._inner.diffusion_model
        every_row = torch.ones(x.shape[0], dtype=torch.bool)
        with contextlib.ExitStack() as stack:
            for action in actions:
                rows = action.rows(every_row, t)
                if rows:
                    stack.enter_context(action.active(unet, rows))
            return self._inner.apply_model(x, t, *args, **kwargs)


def _prepare_as_negative_model(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: a model prepared with negative conds only (how Dual Model CFG Guider
    prepares its negative model) gets a ``NegativePassModel`` as its inner model."""
    inner, conds_out, models = executor(model, noise_shape, conds, *args, **kwargs)
    if set(conds) == {"negative"} and not isinstance(inner, NegativePassModel):
        inner = NegativePassModel(inner, model)
    return inner, conds_out, models


def _check_dual_guider(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper of an Apply NPO model: in a Dual Model CFG Guider the negative pass runs on
    ``model_negative``; refuse when that model does not carry this model's NPO offsets."""
    guider = getattr(executor, "class_obj", None)
    negative = getattr(guider, "uncond_model_patcher", None)
    if negative is not None and not math.isclose(getattr(guider, "cfg", 1.0), 1.0):
        mine = npo_actions(guider.model_patcher)
        theirs = {id(a) for a in npo_actions(negative)}
        if mine and not all(id(a) in theirs for a in mine):
            raise NPOError(
                "Apply NPO's model is the positive model of a Dual Model CFG Guider whose model_negative "
                "does not carry the offset, and that guider runs the negative pass on model_negative only: "
                "the offset would change nothing. Connect Apply NPO's output to model_negative (too), or use "
                "NPO CFG Guider."
            )
    return executor(*args, **kwargs)


def _add_dual_model_support(mp) -> None:
    """Registers both wrappers once per patcher (ComfyUI versions without a dual-model guider never
    meet the case they act on). The PREPARE_SAMPLING one goes into ``model_options``: a guider prepares
    its negative model with that model's own options, which never get the patcher's ``wrappers``."""
    ext = comfy.patcher_extension
    if not ext.get_wrappers_with_key(ext.WrappersMP.PREPARE_SAMPLING, DUAL_WRAPPER_KEY, mp.model_options, True):
        ext.add_wrapper_with_key(
            ext.WrappersMP.PREPARE_SAMPLING, DUAL_WRAPPER_KEY, _prepare_as_negative_model, mp.model_options, True
        )
    if npo_actions(mp) and not mp.get_wrappers(ext.WrappersMP.OUTER_SAMPLE, DUAL_WRAPPER_KEY):
        mp.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, DUAL_WRAPPER_KEY, _check_dual_guider)


# ---------------------------------------------------------------------------------------------
# weight patches (NPO Negative Model): ComfyUI's own LoRA machinery applies them
# ---------------------------------------------------------------------------------------------
def add_offset_patches(model, offset: NPOOffset, strength: float):
    """A clone of ``model`` with θ + strength·δ as ComfyUI weight patches (resolved offset)."""
    sd = formats.to_comfy_state_dict(offset)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = (
        comfy.lora.load_lora(sd, key_map, log_missing=False)
        if _accepts_log_missing()
        else comfy.lora.load_lora(sd, key_map)
    )
    expected = {PREFIX + k for k in offset.entries}
    landed = {k if isinstance(k, str) else k[0] for k in patches}
    missing = sorted(expected - landed)
    if missing:
        raise NPOError(f"npo_offset: {len(missing)} offset tensors did not land as weight patches, e.g. {missing[:3]}")
    mp = model.clone()
    mp.add_patches(patches, strength)
    _add_dual_model_support(mp)
    return mp


def _accepts_log_missing() -> bool:
    import inspect

    return "log_missing" in inspect.signature(comfy.lora.load_lora).parameters


# ---------------------------------------------------------------------------------------------
# NPO CFG Guider helpers
# ---------------------------------------------------------------------------------------------
def patch_difference(model, negative) -> NPOOffset:
    """For a ``negative`` that shares weights with ``model`` (``is_clone``): the offset δ with
    θ_negative = θ_model + δ, read from the two patchers' weight patches. LoRA patches stacked on top of
    ``model``'s stay low-rank (exact); anything else becomes a dense difference of patched weights."""
    if negative.object_patches.keys() != model.object_patches.keys():
        raise NPOError(
            "negative_model: has object patches (e.g. a different model_sampling) that model lacks; "
            "connect a separately loaded model instead."
        )
    entries: dict[str, LowRank | Dense] = {}
    for key in sorted(set(model.patches) | set(negative.patches)):
        if not key.startswith(PREFIX):
            continue
        pos = model.patches.get(key, [])
        neg = negative.patches.get(key, [])
        name = key[len(PREFIX) :]
        stacked = len(neg) >= len(pos) and all(a is b for a, b in zip(pos, neg, strict=False))
        extra = neg[len(pos) :] if stacked else None
        if extra is not None and not extra:
            continue
        lowrank = _as_lowrank(extra, name) if extra is not None else None
        if lowrank is not None:
            entries[name] = lowrank
            continue
        w0 = original_weight(model, name).float()
        wp = comfy.lora.calculate_weight(pos, w0.clone(), key) if pos else w0
        wn = comfy.lora.calculate_weight(neg, w0.clone(), key) if neg else w0
        d = wn.float() - wp.float()
        if torch.count_nonzero(d):
            entries[name] = Dense(d)
    return NPOOffset(entries, source_format="negative_model patches", source="negative_model")


def _as_lowrank(extra: list, name: str) -> LowRank | None:
    """Stacked LoRA patches (strength, LoRAAdapter, strength_model=1, no offset/function) as one LowRank."""
    ups, downs = [], []
    for strength_patch, value, strength_model, off, fn in extra:
        weights = getattr(value, "weights", None)
        if getattr(value, "name", None) != "lora" or strength_model != 1.0 or off is not None or fn is not None:
            return None
        up, down, alpha, mid, dora, reshape = (list(weights) + [None] * 6)[:6]
        if mid is not None or dora is not None or reshape is not None:
            return None
        rank = down.shape[0]
        scale = strength_patch * (float(alpha) / rank if alpha is not None else 1.0)
        ups.append(up.float() * scale)
        downs.append(down.float())
    if not ups:
        return None
    return LowRank(torch.cat(ups, 1), torch.cat(downs, 0))


class NPOCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose negative pass runs NPO weights.

    - an offset (or a ``negative_model`` that shares weights with ``model``): the model is wrapped by
      ``apply_offset``, so cond and uncond stay in one batch;
    - an independent ``negative_model``: the uncond pass runs on it, the cond pass on ``model``
      (two UNet calls per step), with pre-/post-CFG functions applied as ComfyUI does.
    """

    def __init__(self, model_patcher, negative_patcher=None):
        if negative_patcher is not None:
            model_patcher = model_patcher.clone()
            model_patcher.set_additional_models("npo_negative_model", [negative_patcher])
        super().__init__(model_patcher)
        self.negative_patcher = negative_patcher

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        if self.negative_patcher is None:
            return super().predict_noise(x, timestep, model_options=model_options, seed=seed)
        import math

        pos = self.conds.get("positive", None)
        neg = self.conds.get("negative", None)
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            neg = None
        cond_out = comfy.samplers.calc_cond_batch(self.inner_model, [pos], x, timestep, model_options)[0]
        # like sampling_function: a skipped uncond (cfg 1) is a zero prediction, never None
        out = [cond_out, torch.zeros_like(cond_out)]
        if neg is not None:
            neg_model = self.negative_patcher.model
            if hasattr(neg_model, "current_patcher"):
                neg_model.current_patcher = self.negative_patcher
            out[1] = comfy.samplers.calc_cond_batch(neg_model, [neg], x, timestep, model_options)[0]
        conds = [pos, neg]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {
                "conds": conds,
                "conds_out": out,
                "cond_scale": self.cfg,
                "timestep": timestep,
                "input": x,
                "sigma": timestep,
                "model": self.inner_model,
                "model_options": model_options,
            }
            out = fn(args)
        return comfy.samplers.cfg_function(
            self.inner_model, out[0], out[1], self.cfg, x, timestep, model_options=model_options, cond=pos, uncond=neg
        )


def make_guider(
    model, positive, negative, cfg: float, offset: NPOOffset | None = None, strength: float = 1.0, negative_model=None
) -> NPOCFGGuider:
    if (offset is None) == (negative_model is None):
        raise NPOError("NPO CFG Guider: connect exactly one of npo_offset or negative_model.")
    if offset is not None:
        guider = NPOCFGGuider(apply_offset(model, offset, strength))
    elif negative_model.is_clone(model):
        # Two clones of one module cannot both be loaded (COMFYUI.md §3 row D): express the negative
        # model as an offset over ``model`` and inject it on the uncond rows instead.
        diff = patch_difference(model, negative_model)
        guider = NPOCFGGuider(apply_offset(model, diff, 1.0) if diff.entries else model)
    else:
        check_unet_model(negative_model, "negative_model")
        if model_arch(negative_model) != model_arch(model):
            raise NPOError(
                f"negative_model is {model_arch(negative_model)} but model is {model_arch(model)}; they must "
                "be the same architecture."
            )
        guider = NPOCFGGuider(model, negative_model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


# ---------------------------------------------------------------------------------------------
# Self-NPO training: the ComfyUI side (denoiser, conds, pool, schedule, precision)
# ---------------------------------------------------------------------------------------------
def check_trainable(mp, input_name: str = "model") -> None:
    """TDFT needs a discrete VP schedule (eps, v or x0 prediction); flow matching and continuous schedules
    are refused. Judged on the model_sampling the model will really run with, so a ModelSampling* node
    that turned an SD model into a flow model is caught too."""
    import comfy.model_sampling as ms_types

    check_unet_model(mp, input_name)
    ms = mp.get_model_object("model_sampling")
    discrete_vp = isinstance(ms, ms_types.ModelSamplingDiscrete) and isinstance(ms, ms_types.EPS)
    if not discrete_vp or isinstance(ms, ms_types.CONST):
        bases = type(ms).__bases__  # ModelSampling* nodes build a class from (schedule, prediction type)
        kind = " + ".join(b.__name__ for b in bases) if len(bases) > 1 else type(ms).__name__
        raise NPOError(
            f"{input_name}: Self-NPO training supports discrete eps-, v- and x0-prediction models (SD1.5/SD2/"
            f"SDXL); this model samples with {kind} (flow matching or a continuous schedule, e.g. "
            "after a ModelSampling node), which TDFT's DDIM rollout does not handle. Connect the model "
            "without that node, or a model of a supported family."
        )


def ignored_sampling_patches(mp) -> list[str]:
    """The model's sampling-time UNet patches that training does not run (``apply_model`` is called
    without them): unet wrapper functions, transformer patches and replacements, APPLY_MODEL-style
    wrappers (FreeU, attention patches, Apply NPO, ...). Weight patches (LoRAs) and the model_sampling
    object patch *are* used."""
    mo = mp.model_options
    out = ["model_function_wrapper"] if mo.get("model_function_wrapper") else []
    to = mo.get("transformer_options", {})
    for kind in ("patches", "patches_replace"):
        out += [f"{kind}:{name}" for name, v in to.get(kind, {}).items() if v]
    out += [f"wrapper:{kind}" for kind, by_key in to.get("wrappers", {}).items() if any(by_key.values())]
    return out


def schedule_sigmas(mp) -> torch.Tensor:
    """The model's discrete k-diffusion sigmas ν_t, t = 0..T−1 (ModelSamplingDiscrete.sigmas)."""
    ms = mp.get_model_object("model_sampling")
    sig = getattr(ms, "sigmas", None)
    if sig is None or sig.dim() != 1 or sig.shape[0] < 100:
        raise NPOError("model: its model_sampling has no discrete sigma table; Self-NPO needs a discrete schedule.")
    return sig.detach().float().cpu()


def load_for_training(mp) -> torch.device:
    import comfy.model_management as mm

    mm.load_models_gpu([mp], memory_required=0, force_full_load=True)
    return mm.get_torch_device()


def throw_if_interrupted() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def conditioning_entries(conditioning, input_name: str) -> list:
    """One ComfyUI CONDITIONING entry per prompt (Conditioning (Combine) stacks several)."""
    if not conditioning:
        raise NPOError(f"{input_name}: empty conditioning; connect a CLIP Text Encode output.")
    return [[c[0], dict(c[1])] for c in conditioning]


def model_conds(mp, entry, latent_shape: tuple[int, ...], device, prompt_type: str) -> dict[str, torch.Tensor]:
    """Batch-1 model inputs for one conditioning entry: ``{"c_crossattn": ..., "y": ...}`` (SDXL adds y)."""
    import comfy.sampler_helpers

    conds = comfy.sampler_helpers.convert_cond([entry])
    noise = torch.zeros(latent_shape)
    conds = comfy.samplers.encode_model_conds(mp.model.extra_conds, conds, noise, device, prompt_type)
    out = {}
    for k, v in conds[0]["model_conds"].items():
        if k in ("c_crossattn", "y"):
            out[k] = v.cond.to(device)
        elif k not in ("c_concat",):
            continue
    if "c_crossattn" not in out:
        raise NPOError("positive/negative: the conditioning has no cross-attention tensor for this model.")
    return out


def training_denoiser(mp, compute_dtype: torch.dtype):
    """D(x_ve, ν, cond) -> x0 over the ComfyUI model (apply_model converts eps/v to x0). A float16 or
    bfloat16 model runs under autocast (CUDA or CPU), so fp32 LoRA weights and fp32 masters mix with it;
    the returned x0 is float32."""
    base = mp.model

    def denoise(x, sigma, cond):
        kwargs = {"y": cond["y"].to(compute_dtype)} if "y" in cond else {}
        autocast = x.device.type in ("cuda", "cpu") and compute_dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(x.device.type, dtype=compute_dtype, enabled=autocast):
            out = base.apply_model(
                x.to(compute_dtype),
                sigma.float(),
                c_crossattn=cond["c_crossattn"].to(compute_dtype),
                transformer_options={},
                **kwargs,
            )
        return out.float()

    return denoise


def latent_to_model_space(mp, samples: torch.Tensor) -> torch.Tensor:
    return mp.model.process_latent_in(samples)


def latent_channels(mp) -> int:
    return int(mp.model.latent_format.latent_channels)


def sample_pool(
    mp,
    positive_entries: list,
    negative,
    count: int,
    width: int,
    height: int,
    steps: int,
    cfg: float,
    seed: int,
    on_sample,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free start pool: ``count`` latents sampled from the frozen model, prompts cycling.
    Returns (latents in LATENT space [N,C,h,w], prompt index per latent)."""
    import comfy.sample

    c = latent_channels(mp)
    shape = (1, c, height // 8, width // 8)
    out, prompt_of = [], []
    for i in range(count):
        p = i % len(positive_entries)
        gen = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(shape, generator=gen)
        lat = comfy.sample.sample(
            mp,
            noise,
            steps,
            cfg,
            "euler",
            "normal",
            [positive_entries[p]],
            negative,
            torch.zeros(shape),
            seed=seed + i,
            disable_pbar=True,
        )
        out.append(lat.float().cpu())
        prompt_of.append(p)
        on_sample(i + 1)
    return torch.cat(out), torch.tensor(prompt_of)


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

    def __init__(self, mp, gradient_checkpointing: bool, copy_weights: bool = True) -> None:
        self.unet = unet_of(mp)
        self.gradient_checkpointing = gradient_checkpointing
        self.copy_weights = copy_weights
        self._originals: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self._by_name: dict[str, torch.nn.Parameter] = {}
        self._forwards: list[torch.nn.Module] = []

    def __enter__(self):
        with torch.inference_mode(False):
            for mod_name, module in self.unet.named_modules():
                for pname, old in list(module._parameters.items()):
                    if old is None:
                        continue
                    data = old.data.clone() if self.copy_weights else _autograd_alias(old.data)
                    module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)
                    self._originals.append((module, pname, old))
                    self._by_name[f"{mod_name}.{pname}" if mod_name else pname] = old
        if self.gradient_checkpointing:
            self._checkpoint_blocks()
        return self

    def _checkpoint_blocks(self) -> None:
        import torch.utils.checkpoint as ckpt
        from comfy.ldm.modules.attention import BasicTransformerBlock
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        for m in self.unet.modules():
            if isinstance(m, (BasicTransformerBlock, ResBlock)):
                inner = m.forward

                def forward(*args, _inner=inner, **kwargs):
                    if not torch.is_grad_enabled():
                        return _inner(*args, **kwargs)
                    return ckpt.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

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
        for m in self._forwards:
            del m.forward
        for module, pname, old in self._originals:
            module._parameters[pname] = old
        self._originals.clear()
        self._by_name.clear()
        return False


def output_dir() -> str:
    return folder_paths.get_output_directory()


def npo_dir() -> str:
    register_npo_folder()
    return folder_paths.get_folder_paths(NPO_FOLDER)[0]


def save_path(base_dir: str, filename_prefix: str, input_name: str = "filename_prefix") -> tuple[str, str, int]:
    """(folder, base filename, next counter) inside ``base_dir``; refuses prefixes that leave it."""
    if os.path.isabs(filename_prefix) or ".." in filename_prefix.replace("\\", "/").split("/"):
        raise NPOError(
            f"{input_name}: '{filename_prefix}' must be a relative name without '..' (files are written "
            f"inside {base_dir})."
        )
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, base_dir)
    except Exception as e:
        raise NPOError(f"{input_name}: '{filename_prefix}' is not allowed ({e}).") from None
    if not _inside(os.path.realpath(folder), os.path.realpath(base_dir)):
        raise NPOError(
            f"{input_name}: '{filename_prefix}' points outside {base_dir} (a symlink?); choose another name."
        )
    return folder, filename, counter


_OOM_TYPES = (torch.cuda.OutOfMemoryError,)  # torch.OutOfMemoryError is the same class since torch 2.5
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA/ROCm raise OutOfMemoryError; the CPU and MPS allocators raise a RuntimeError saying so."""
    return isinstance(e, _OOM_TYPES) or (isinstance(e, RuntimeError) and any(w in str(e) for w in _OOM_WORDS))


@contextlib.contextmanager
def explain_out_of_memory(what: str, remedies: str):
    """Turn an out-of-memory error inside the block into an NPOError naming the knobs that lower memory.

    The original exception (whose traceback pins the frames holding the big tensors) is dropped
    before ComfyUI's cache is emptied, so the memory is really given back."""
    try:
        yield
    except (RuntimeError, *_OOM_TYPES) as e:
        if not is_out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    else:
        return
    import comfy.model_management

    comfy.model_management.soft_empty_cache()
    raise NPOError(f"out of memory during {what} ({first}). {remedies}")


def progress_bar(total: int):
    import comfy.utils

    return comfy.utils.ProgressBar(total)
