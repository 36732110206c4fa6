"""The family records: lookup through a config class's MRO, the names files carry, which offsets a family takes."""

from __future__ import annotations

import pytest

from comfyui_npo.npo_core import families
from comfyui_npo.npo_core.families import family_for

BASE = "BASE"  # comfy.supported_models_base.BASE, the root of every config class


def test_a_config_class_with_its_own_record_gets_it():
    ssd = family_for(["SSD1B", "SDXL", BASE, "object"], unet=True)
    assert ssd.config == "SSD1B" and ssd.name == "SSD1B" and ssd.unet and ssd.lineage == "SDXL"
    assert ssd.learning_rates == families.LEARNING_RATES["sdxl"]


def test_a_subclass_without_a_record_inherits_under_its_own_name():
    wan_i2v = family_for(["WAN21_I2V", "WAN21_T2V", BASE, "object"], unet=False)
    assert wan_i2v.config == wan_i2v.name == "WAN21_I2V" and not wan_i2v.unet
    hunyuan1 = family_for(["HunyuanDiT1", "HunyuanDiT", BASE, "object"], unet=False)
    assert hunyuan1.name == "HunyuanDiT1" and hunyuan1.folded_rows == ("mlp_t5.",)
    cosmos_i2v = family_for(["CosmosI2V", "CosmosT2V", BASE, "object"], unet=False)
    assert cosmos_i2v.unsupported and "T·H·W·B·D" in cosmos_i2v.unsupported
    future_xl = family_for(["SDXL_Future", "SDXL", BASE, "object"], unet=True)
    assert future_xl.name == "SDXL_Future" and future_xl.lineage == "SDXL" and future_xl.lr_group == "sdxl"
    assert future_xl.modelspec is None and future_xl.text_context is None  # files of 2048 are still "SDXL"


def test_an_unknown_class_gets_a_plain_record_of_its_kind():
    new = family_for(["BrandNewDiT", BASE, "object"], unet=False)
    assert new.name == "BrandNewDiT" and not new.unet and new.unsupported is None and not new.folded_rows
    assert new.preset("attention") == families.DIT_PRESETS["attention"]


@pytest.mark.parametrize(
    "config, name",
    [
        ("SD15", "SD15"), ("SD20", "SD2"), ("SD21UnclipL", "SD2"), ("SD21UnclipH", "SD21UnclipH"), ("SDXL", "SDXL"),
        ("SSD1B", "SSD1B"), ("SDXLRefiner", "SDXLRefiner"), ("WAN21_T2V", "WAN21_T2V"),
        ("CogVideoX_T2V", "CogVideoX_T2V"),
    ],
)
def test_names_written_into_files_are_those_written_before(config, name):
    """Offsets saved before the records existed carry these names (Self-NPO Train's old name map)."""
    assert families.BY_CONFIG[config].name == name


@pytest.mark.parametrize(
    "config, made_for, takes",
    [
        ("SSD1B", "SSD1B", True),  # the bug: an offset trained on SSD1B was refused on SSD1B
        ("Segmind_Vega", "Segmind_Vega", True),
        ("KOALA_700M", "KOALA_700M", True),
        ("SDXLRefiner", "SDXLRefiner", True),
        ("SSD1B", "SDXL", True),  # an SDXL offset may try an SDXL-derived UNet (its keys decide)
        ("SDXL", "SSD1B", False),  # not the reverse
        ("SDXL", "SD15", False),
        ("SDXLRefiner", "SDXL", False),
        ("SD21UnclipH", "SD2", True),
        ("SD15_instructpix2pix", "SD15", True),
        ("SD15", "SD15_instructpix2pix", False),
        ("WAN21_T2V", "WAN21_T2V", True),
        ("WAN21_T2V", "SD15", False),
        ("SD15", "WAN21_T2V", False),
        ("SD15", "unknown (text context 4096)", True),  # left to the key checks
        ("SD3", "unknown", True),
    ],
)
def test_which_offsets_a_family_takes(config, made_for, takes):
    assert families.BY_CONFIG[config].takes_offsets_made_for(made_for) is takes


def test_detection_from_text_context_and_modelspec_ids():
    assert [families.detected_from_context(c) for c in (768, 1024, 2048, 1280, 4096)] == [
        "SD15", "SD2", "SDXL", "SDXLRefiner", None
    ]
    assert families.modelspec_architecture("SD15") == "stable-diffusion-v1/lora"
    assert families.modelspec_architecture("SD2") == "stable-diffusion-v2/lora"
    assert families.modelspec_architecture("SDXL") == "stable-diffusion-xl-v1-base/lora"
    assert families.modelspec_architecture("WAN21_T2V") == "WAN21_T2V/lora"
    assert families.modelspec_architecture("") == "unknown/lora"


def test_presets_per_kind_and_own_presets():
    assert families.BY_CONFIG["SD15"].preset("attention") == families.UNET_PRESETS["attention"]
    assert families.BY_CONFIG["SD3"].preset("attention+ff") == families.DIT_PRESETS["attention+ff"]
    cog = families.BY_CONFIG["CogVideoX_T2V"]
    assert cog.preset("attention") != families.DIT_PRESETS["attention"] and cog.preset("all") == r".*"
    assert cog.preset(r"blocks\.0\.q$") == r"blocks\.0\.q$"  # not a preset: taken as a regex
    assert families.PRESET_NAMES == ("attention", "attention+ff", "all")


def test_every_record_is_consistent():
    names = [r.config for r in families.RECORDS]
    assert len(names) == len(set(names))
    for r in families.RECORDS:
        assert r.lr_group in families.LEARNING_RATES
        assert bool(r.mixed_rows) == bool(r.mixed_reason), r.config
        assert r.lineage is None or (r.unet and r.lineage in families.SD_LINEAGES), r.config
    contexts = [r.text_context for r in families.RECORDS if r.text_context is not None]
    assert len(contexts) == len(set(contexts))
