"""HPS v2.1 (Wu et al. 2023) from its open_clip checkpoint, on ComfyUI IMAGE tensors, without the hpsv2 package.

HPS v2.1 is an open_clip ViT-H-14 fine-tune (``HPS_v2.1_compressed.pt``: a torch checkpoint whose ``state_dict``
holds open_clip CLIP keys, possibly with a "module." prefix). Its open_clip "VisionTransformer + TextTransformer"
keys are converted onto transformers' CLIPModel: ``visual.conv1`` → patch embedding, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (split into q, k,
v), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj`` (transposed into visual_projection); the
text tower likewise, with ``ln_final`` and ``text_projection`` (transposed); ``logit_scale``. The CLIPConfig comes
from the tensor shapes; the head counts (not visible in the weights) from a table by tower and width (ViT-H-14:
vision 1280 → 16 heads of 80, text 1024 → 16 heads of 64); the activation is GELU (open_clip's ViT-H-14 is not a
quick_gelu model).

Conventions: score_i = cos(image embedding of images[i], text embedding of prompts[i]) (HPS's
``image_features @ text_features.T`` after normalisation, diagonal; no logit scale), in float32 whatever the model
dtype, returned as float32 on the CPU. Prompts: the CLIP BPE tokenizer of a local folder (laion/CLIP-ViT-H-14's
tokenizer files) through transformers, truncated to the context (77: BOS, 75 tokens, EOT, as open_clip's tokenizer
truncates) and padded with zeros after EOT as open_clip pads; the text is pooled at the EOT (the config's
eos_token_id is the tokenizer's <|endoftext|> id), and the causal mask makes the padding irrelevant. Images: open_clip's
ViT-H-14 eval transform (shortest side to 224 bicubic, centre crop 224, OpenAI mean / std), with torchvision's
centre crop (top ``int(round((h - 224) / 2))``, not ClipPreprocess's floor). Weights: a pickle is read with
``torch.load(weights_only=True)`` only; anything that needs more is refused naming the file. transformers is
imported when a model is loaded. The default dtype is float32 (the checkpoint may be half precision).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..npo_core.errors import NPOError
from .clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_BICUBIC, ClipPreprocess
from .clip_scorer import ClipPairScorer
from .pickscore import load_tokenizer, require_tokenizer_files
from .weights import read_weights

EOT_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
# attention heads by tower and width (open_clip's model configs: ViT-B/L/H/g/bigG); other widths: width // 64
VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
TEXT_HEADS = {512: 8, 768: 12, 1024: 16, 1280: 20}
HPS_FIX = (
    "pass HPS_v2.1_compressed.pt (xswu/HPSv2 on Hugging Face), an open_clip ViT-H-14 checkpoint whose 'state_dict' "
    "holds visual.* and transformer.* keys"
)


@dataclass(frozen=True)
class OpenClipPreprocess(ClipPreprocess):
    """ClipPreprocess with torchvision's CenterCrop (what open_clip's eval transform uses): top
    ``int(round((h - crop_h) / 2))`` (Python's round, half to even), zero padding as torchvision pads."""

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop_hw is None:
            return x
        ch, cw = self.crop_hw
        h, w = x.shape[-2:]
        if ch > h or cw > w:
            ph, pw = max(ch, h), max(cw, w)
            padded = x.new_zeros((*x.shape[:-2], ph, pw))
            top_pad, left_pad = (ph - h) // 2, (pw - w) // 2  # torchvision: the smaller half on the top / left
            padded[..., top_pad : top_pad + h, left_pad : left_pad + w] = x
            x, h, w = padded, ph, pw
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        return x[..., top : top + ch, left : left + cw]


def open_clip_preprocess(image_size: int = 224) -> OpenClipPreprocess:
    """open_clip's eval transform for an OpenAI-normalised CLIP of ``image_size`` (ViT-H-14: 224)."""
    return OpenClipPreprocess(
        shortest_edge=image_size,
        crop_hw=(image_size, image_size),
        rescale_factor=1 / 255,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        resample=PIL_BICUBIC,
    )


def load_open_clip_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The open_clip state dict of an HPS checkpoint: {"state_dict": sd, ...} or sd itself, "module." stripped;
    a .safetensors file holds sd flat. Read with torch.load(weights_only=True) only."""
    path = Path(path)
    ckpt = read_weights(
        path,
        pickle_fix="only if you trust its source, convert it once: sd = torch.load(path, weights_only=False); "
        "safetensors.torch.save_file(sd.get('state_dict', sd), '<name>.safetensors'), and load the .safetensors "
        "file instead",
        missing="put the HPS v2.1 checkpoint (HPS_v2.1_compressed.pt) there",
        formats="use the .pt checkpoint or a .safetensors file",
    )
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not ckpt:
        raise NPOError(f"{path} holds {type(ckpt).__name__}, not an open_clip state dict; {HPS_FIX}")
    sd = {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(k, str)}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad or len(sd) != len(ckpt):
        raise NPOError(f"{path}: the state dict holds non-tensor entries (first: {bad[:1]}); {HPS_FIX}")
    return sd


def _heads(width: int, table: dict[int, int], tower: str, override: int | None, source: str) -> int:
    heads = override if override is not None else table.get(width, width // 64)
    if heads <= 0 or width % heads:
        raise NPOError(
            f"{source}: the {tower} tower is {width} wide and {heads} attention heads do not divide it; this is not "
            f"an open_clip ViT checkpoint of a known width; {HPS_FIX}"
        )
    return heads


def _blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """How many resblocks under ``prefix`` (0, 1, ..., n - 1 all present)."""
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found != set(range(len(found))):
        raise NPOError(f"resblocks under {prefix!r} are not numbered 0..{len(found) - 1}: {sorted(found)}; {HPS_FIX}")
    return len(found)


def convert_open_clip(
    sd: dict[str, torch.Tensor],
    source: str = "checkpoint",
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(CLIPConfig kwargs, CLIPModel state dict) of an open_clip CLIP state dict; every key must be used."""
    required = [
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.ln_post.weight",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "text_projection",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.attn.in_proj_weight",
    ]
    missing = [k for k in required if k not in sd]
    if missing:
        raise NPOError(
            f"{source}: not an open_clip CLIP checkpoint, {len(missing)} keys missing "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); {HPS_FIX}"
        )
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise NPOError(f"{source}: {key} is missing; the checkpoint is incomplete; {HPS_FIX}")
        used.add(key)
        return sd[key]

    def tower(src: str, dst: str, n: int, width: int) -> None:
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):  # fmt: skip
                out[f"{d}{b}.weight"] = take(f"{s}{a}.weight")
                out[f"{d}{b}.bias"] = take(f"{s}{a}.bias")
            w, b = take(f"{s}attn.in_proj_weight"), take(f"{s}attn.in_proj_bias")
            if w.shape != (3 * width, width) or b.shape != (3 * width,):
                raise NPOError(f"{source}: {s}attn.in_proj_weight is {tuple(w.shape)}, expected {(3 * width, width)}")
            for name, wq, bq in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3), b.chunk(3), strict=True):
                out[f"{d}self_attn.{name}.weight"] = wq
                out[f"{d}self_attn.{name}.bias"] = bq

    # vision tower
    conv = take("visual.conv1.weight")  # [width, 3, patch, patch], no bias
    v_width, patch = conv.shape[0], conv.shape[-1]
    v_pos = take("visual.positional_embedding")
    grid = math.isqrt(v_pos.shape[0] - 1)
    if grid * grid != v_pos.shape[0] - 1 or v_pos.shape[1] != v_width:
        raise NPOError(f"{source}: visual.positional_embedding is {tuple(v_pos.shape)}, not 1 + a square grid")
    v_layers = _blocks(sd, "visual.transformer.resblocks.")
    v_proj = take("visual.proj")  # [width, embed]
    embed = v_proj.shape[1]
    v = "vision_model."
    out[f"{v}embeddings.patch_embedding.weight"] = conv
    out[f"{v}embeddings.class_embedding"] = take("visual.class_embedding")
    out[f"{v}embeddings.position_embedding.weight"] = v_pos
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"{v}{b}.weight"], out[f"{v}{b}.bias"] = take(f"visual.{a}.weight"), take(f"visual.{a}.bias")
    tower("visual.transformer.resblocks.", f"{v}encoder.layers.", v_layers, v_width)
    out["visual_projection.weight"] = v_proj.t()
    v_inter = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]

    # text tower
    tok = take("token_embedding.weight")  # [vocab, width]
    vocab, t_width = tok.shape
    t_pos = take("positional_embedding")  # [context, width]
    t_layers = _blocks(sd, "transformer.resblocks.")
    t_proj = take("text_projection")  # [width, embed]
    if t_proj.shape != (t_width, embed):
        raise NPOError(f"{source}: text_projection is {tuple(t_proj.shape)}, expected {(t_width, embed)}")
    t = "text_model."
    out[f"{t}embeddings.token_embedding.weight"] = tok
    out[f"{t}embeddings.position_embedding.weight"] = t_pos
    out[f"{t}final_layer_norm.weight"] = take("ln_final.weight")
    out[f"{t}final_layer_norm.bias"] = take("ln_final.bias")
    tower("transformer.resblocks.", f"{t}encoder.layers.", t_layers, t_width)
    out["text_projection.weight"] = t_proj.t()
    t_inter = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    out["logit_scale"] = take("logit_scale").reshape(())

    used.update(k for k in sd if k == "attn_mask")  # a causal-mask buffer some open_clip versions saved
    extra = sorted(set(sd) - used)
    if extra:
        raise NPOError(
            f"{source}: {len(extra)} keys this open_clip ViT conversion does not know (first: {extra[0]}): not the "
            f"plain ViT + text transformer layout (attentional pooling, layer scale, ...); {HPS_FIX}"
        )
    config = dict(
        projection_dim=embed,
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=v_inter,
            num_hidden_layers=v_layers,
            num_attention_heads=_heads(v_width, VISION_HEADS, "vision", vision_heads, source),
            image_size=grid * patch,
            patch_size=patch,
            num_channels=conv.shape[1],
            projection_dim=embed,
            hidden_act=hidden_act,
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            hidden_size=t_width,
            intermediate_size=t_inter,
            num_hidden_layers=t_layers,
            num_attention_heads=_heads(t_width, TEXT_HEADS, "text", text_heads, source),
            max_position_embeddings=t_pos.shape[0],
            vocab_size=vocab,
            projection_dim=embed,
            hidden_act=hidden_act,
            layer_norm_eps=1e-5,
        ),
    )
    return config, out


class HPSv21(ClipPairScorer):
    """A CLIPModel converted from open_clip + a CLIP tokenizer + open_clip's preprocessing; ``score(images, prompts)``
    → [B] float32 (CPU), the cosine of image i and prompt i."""

    name = "HPS v2.1"

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, backend: str = "pil", batch_size: int = 16):
        super().__init__(model, tokenizer, preprocess, backend, batch_size)
        self.context = model.config.text_config.max_position_embeddings
        self.eot_id = model.config.text_config.eos_token_id

    @classmethod
    def from_file(
        cls,
        checkpoint_path: str | Path,
        tokenizer_folder: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "pil",
        vision_heads: int | None = None,
        text_heads: int | None = None,
        hidden_act: str = "gelu",
    ) -> HPSv21:
        """Load HPS_v2.1_compressed.pt (or any open_clip ViT CLIP checkpoint of the same layout) and the CLIP
        tokenizer files of ``tokenizer_folder`` (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's); dtype None: float32.
        ``vision_heads`` / ``text_heads`` / ``hidden_act`` are for other open_clip ViTs (HPS v2.1: the defaults)."""
        import transformers

        path, folder = Path(checkpoint_path), Path(tokenizer_folder)
        if not folder.is_dir():
            raise NPOError(
                f"tokenizer_folder: {folder} is not a folder; copy the CLIP tokenizer files (tokenizer.json or "
                "vocab.json + merges.txt) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K into one"
            )
        require_tokenizer_files(folder)
        sd = load_open_clip_checkpoint(path)
        config_kw, hf_sd = convert_open_clip(sd, str(path), vision_heads, text_heads, hidden_act)
        tokenizer = load_tokenizer(folder)
        eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        bos = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
        vocab = config_kw["text_config"]["vocab_size"]
        if not isinstance(eot, int) or eot != tokenizer.eos_token_id or eot >= vocab or len(tokenizer) > vocab:
            raise NPOError(
                f"{folder}: the tokenizer ({len(tokenizer)} tokens, {EOT_TOKEN} id {eot}) does not fit the "
                f"checkpoint's {vocab}-token embedding; copy the tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
            )
        # pooled at the first eos_token_id (transformers >= 4.31 when eos_token_id != 2), as open_clip's argmax
        config_kw["text_config"].update(eos_token_id=eot, bos_token_id=bos, pad_token_id=0)
        config = transformers.CLIPConfig(**config_kw)
        hf_sd = {k: v.to(torch.float32) for k, v in hf_sd.items()}
        try:
            model, info = transformers.CLIPModel.from_pretrained(
                None, config=config, state_dict=hf_sd, output_loading_info=True
            )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise NPOError(f"{path}: transformers could not build the converted CLIP model ({e}); {HPS_FIX}") from e
        problems = sorted(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
        problems += sorted(info.get("unexpected_keys") or [])
        if problems:
            raise NPOError(
                f"{path}: the converted weights do not fit transformers' CLIPModel ({len(problems)} keys missing, "
                f"unexpected or of the wrong shape, first: {problems[0]}); {HPS_FIX}"
            )
        model = model.eval().requires_grad_(False).to(device=device, dtype=dtype or torch.float32)
        preprocess = open_clip_preprocess(config.vision_config.image_size)
        return cls(model, tokenizer, preprocess, backend=backend)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """[N, context] int64 as open_clip's tokenizer lays them out: BOS, tokens, EOT, zeros (truncated: BOS, 75
        tokens, EOT)."""
        rows = self.tokenizer(list(prompts), truncation=True, max_length=self.context)["input_ids"]
        ids = torch.zeros(len(rows), self.context, dtype=torch.long)
        for i, row in enumerate(rows):
            if not row or row[-1] != self.eot_id:
                raise NPOError(f"prompts[{i}]: the tokenizer did not end it with {EOT_TOKEN}; check its files")
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings [N, D] float32 (not normalised), pooled at the EOT."""
        out = self.model.text_model(input_ids=self.token_ids(prompts).to(self.device))
        return self.model.text_projection(out.pooler_output).float()

    def scale(self) -> float:
        return 1.0  # HPS reports the cosine itself
