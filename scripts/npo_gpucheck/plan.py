"""What the GPU check runs: rows, size profiles, ComfyUI memory modes, time caps (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

# ComfyUI process arguments per memory mode (added to the profile's own, e.g. --cpu for --smoke)
DEFAULT_MODE = "default"
NO_DYNAMIC_MODE = "--disable-dynamic-vram"
MODE_ARGV = {DEFAULT_MODE: [], NO_DYNAMIC_MODE: ["--disable-dynamic-vram"]}
NO_CUDA = "skipped: no CUDA"
NOT_IN_VERSION = "not in this version"
README_WAN_ESTIMATE_GIB = 5.2  # benchmarks/README.md "What a 24 GB GPU needs"; README Limits: "about 5 GiB"

# What comfy.model_detection reads off the released SD1.5 checkpoint (the loader detects it again from the keys).
SD15_FULL = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "adm_in_channels": None, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "context_dim": 768, "num_heads": 8, "use_linear_in_transformer": False,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# Tiny, but still detected as SD15 by ComfyUI's loader (which needs 320 model channels and a 768-wide context).
SD15_TINY = dict(SD15_FULL, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                 transformer_depth_output=[1, 1])
# comfy/model_detection.py for the Wan 2.1 T2V 1.3B checkpoint (1,419 M parameters).
WAN13_FULL = {
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
    "dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 12,
    "num_layers": 30, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
# Tiny, still detected as WAN21_T2V (the loader reads heads as dim // 128 and needs text_dim 4096).
WAN13_TINY = dict(WAN13_FULL, dim=128, ffn_dim=256, num_heads=1, num_layers=1)


@dataclass(frozen=True)
class ModelSpec:
    """One architecture at one size: ComfyUI config class, unet_config, per-sample latent, text, sampling."""

    key: str  # "sd15" | "wan"
    title: str
    config_class: str  # in comfy.supported_models; the loader must detect this class from the weights
    unet_config: dict
    latent: tuple[int, ...]  # one sample as the sampler gets it: [C, H, W] or [C, T, H, W]
    text: tuple[int, int]  # (tokens, width) of the random conditioning
    train_batch: int
    cfg: float
    scheduler: str
    rank: int  # LoRA rank of the trained and of the timing offset
    size: str  # the pixel size the latent stands for


@dataclass(frozen=True)
class Profile:
    """Sizes, steps, caps (seconds) and the total budget of one run."""

    name: str  # "gpu" | "smoke"
    argv: tuple[str, ...]  # ComfyUI arguments every worker gets
    sd15: ModelSpec
    wan: ModelSpec
    train_steps: int
    sample_steps: int
    timing: dict[str, tuple[int, int]]  # model key -> (steps per run, repeats per arm)
    oom_latent: tuple[int, ...]  # the oversized training batch, batch first
    oom_size: str
    caps: dict[str, float]  # row id -> its time cap
    startup_cap: float
    budget: float
    threads: int = 0  # torch intra-op threads in the worker (0: torch's default)

    def model(self, key: str) -> ModelSpec:
        return self.sd15 if key == "sd15" else self.wan


PROFILES = {
    "gpu": Profile(
        name="gpu",
        argv=(),
        sd15=ModelSpec("sd15", "SD1.5 UNet (full size, random weights)", "SD15", SD15_FULL, (4, 64, 64), (77, 768),
                       4, 7.5, "normal", 16, "512×512"),
        wan=ModelSpec("wan", "Wan 2.1 T2V 1.3B (full size, random weights)", "WAN21_T2V", WAN13_FULL,
                      (16, 9, 60, 104), (512, 4096), 1, 6.0, "simple", 16, "480×832, 33 frames"),
        train_steps=3,
        sample_steps=3,
        timing={"sd15": (6, 5), "wan": (4, 3)},
        oom_latent=(64, 4, 256, 256),
        oom_size="2048×2048, batch 64, no gradient checkpointing",
        caps={"train_sd15_fp16": 90, "train_sd15_bf16": 90, "train_wan_bf16": 180, "partial_wan": 180,
              "timing_sd15": 90, "timing_wan": 150, "oom_sd15": 150},
        startup_cap=150,
        budget=480,
    ),
    "smoke": Profile(
        name="smoke",
        argv=("--cpu",),
        sd15=ModelSpec("sd15", "SD1.5-shaped UNet (tiny)", "SD15", SD15_TINY, (4, 8, 8), (8, 768), 1, 7.5,
                       "normal", 4, "64×64"),
        wan=ModelSpec("wan", "Wan 2.1 T2V (tiny)", "WAN21_T2V", WAN13_TINY, (16, 2, 8, 8), (8, 4096), 1, 6.0,
                      "simple", 4, "64×64, 5 frames"),
        train_steps=2,
        sample_steps=2,
        timing={"sd15": (3, 2), "wan": (3, 2)},
        oom_latent=(4, 4, 8, 8),
        oom_size="64×64, batch 4, OOM injected",
        caps=dict.fromkeys(("train_sd15_fp16", "train_sd15_bf16", "train_wan_bf16", "partial_wan", "timing_sd15",
                            "timing_wan", "oom_sd15"), 60.0),
        startup_cap=90,
        budget=240,
        threads=1,
    ),
}


@dataclass(frozen=True)
class Row:
    """One check: ``kind`` picks the function in ``rows``; ``modes`` the memory modes it runs in."""

    id: str  # also the key of Profile.caps
    title: str
    kind: str  # "train" | "timing" | "oom"
    model: str  # "sd15" | "wan"
    dtype: str = "bf16"
    partial: bool = False  # Self-NPO Train's partial_loading on (only where the node has the input)
    modes: tuple[str, ...] = (DEFAULT_MODE,)


BOTH = (DEFAULT_MODE, NO_DYNAMIC_MODE)
ROWS = [
    Row("train_sd15_fp16", "Self-NPO Train lora, SD1.5 fp16 (autocast + GradScaler)", "train", "sd15", "fp16",
        modes=BOTH),
    Row("train_sd15_bf16", "Self-NPO Train lora, SD1.5 bf16", "train", "sd15", "bf16", modes=BOTH),
    Row("train_wan_bf16", "Self-NPO Train lora, Wan 1.3B bf16, checkpointing", "train", "wan", "bf16", modes=BOTH),
    Row("partial_wan", "Self-NPO Train lora, Wan 1.3B bf16, partial_loading", "train", "wan", "bf16", partial=True,
        modes=BOTH),
    Row("timing_sd15", "Apply NPO vs plain CFG step time, SD1.5 fp16, batch 1", "timing", "sd15", "fp16"),
    Row("timing_wan", "Apply NPO vs plain CFG step time, Wan 1.3B bf16, batch 1", "timing", "wan", "bf16"),
    Row("oom_sd15", "Self-NPO Train out of memory → NPOError, then sampling works", "oom", "sd15", "fp16"),
]
ROW_BY_ID = {r.id: r for r in ROWS}


def row_key(row_id: str, mode: str) -> str:
    """The id of one row in one memory mode, as the JSON and the table name it."""
    return f"{row_id} [{mode}]"


def rows_for(mode: str) -> list[Row]:
    return [r for r in ROWS if mode in r.modes]
