"""Where the e2e tier's generated model files go: $NPO_E2E_CACHE, else $NPO_CACHE, else ~/.cache/comfyui-npo."""

from __future__ import annotations

from npo_headless import assets


def test_the_asset_cache_follows_npo_e2e_cache_then_npo_cache_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NPO_E2E_CACHE", raising=False)
    monkeypatch.delenv("NPO_CACHE", raising=False)
    home = tmp_path / "home" / ".cache" / "comfyui-npo"
    assert assets.asset_cache_dir() == home / f"e2e-assets-{assets.ASSET_VERSION}"
    monkeypatch.setenv("NPO_CACHE", str(tmp_path / "cache"))
    assert assets.asset_cache_dir() == tmp_path / "cache" / f"e2e-assets-{assets.ASSET_VERSION}"
    assert assets.dit_asset_cache_dir() == tmp_path / "cache" / f"e2e-dit-assets-{assets.DIT_ASSET_VERSION}"
    monkeypatch.setenv("NPO_E2E_CACHE", str(tmp_path / "e2e"))
    assert assets.asset_cache_dir() == tmp_path / "e2e" / f"e2e-assets-{assets.ASSET_VERSION}"
