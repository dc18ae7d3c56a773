"""The empty-prompt embedding is computed once per checkpoint and machine, then read back:
equal to what the text encoder gives, recomputed when the encoder's files change or the
cached file is damaged (depthray/models/empty_prompt.py)."""

from __future__ import annotations

import os

import torch

from depthray.models import empty_prompt


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = empty_prompt.compute

    def counted(folder, variant=None):
        calls.append(1)
        return real(folder, variant)

    monkeypatch.setattr(empty_prompt, "compute", counted)
    return calls


def test_computed_once_then_read_back_and_recomputed_when_the_encoder_changes(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("DEPTHRAY_CACHE", str(tmp_path / "cache"))
    calls = _counting(monkeypatch)
    direct = empty_prompt.compute(tiny_model_dir)
    calls.clear()
    first = empty_prompt.empty_prompt_embedding(tiny_model_dir)
    assert calls == [1] and torch.equal(first, direct)
    assert empty_prompt.cache_path(tiny_model_dir).exists()
    again = empty_prompt.empty_prompt_embedding(tiny_model_dir)
    assert calls == [1] and torch.equal(again, direct)  # read back, not recomputed
    weights = next(p for p in (tiny_model_dir / "text_encoder").iterdir() if p.suffix == ".safetensors")
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "a new file"
        empty_prompt.empty_prompt_embedding(tiny_model_dir)
        assert calls == [1, 1]
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_damaged_cache_file_is_recomputed_and_replaced(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHRAY_CACHE", str(tmp_path / "cache"))
    path = empty_prompt.cache_path(tiny_model_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a tensor")
    calls = _counting(monkeypatch)
    value = empty_prompt.empty_prompt_embedding(tiny_model_dir)
    assert calls == [1] and torch.equal(value, empty_prompt.compute(tiny_model_dir))
    assert torch.equal(torch.load(path, weights_only=True), value)


def test_the_model_uses_it(tiny_model_dir, tmp_path, monkeypatch):
    """A loaded model conditions on the cached tensor: a planted value is what it holds."""
    import depthray

    monkeypatch.setenv("DEPTHRAY_CACHE", str(tmp_path / "cache"))
    planted = torch.full_like(empty_prompt.compute(tiny_model_dir), 0.25)
    path = empty_prompt.cache_path(tiny_model_dir)
    path.parent.mkdir(parents=True)
    torch.save(planted, path)
    model = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir)})
    assert torch.equal(model.empty_text_embedding.float().cpu(), planted)
