"""Safe checkpoint reading (`headforge.models.checkpoints`) and atomic repository entries."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from headforge.errors import InvalidCheckpointError
from headforge.export.repository import staged_entry
from headforge.models.checkpoints import load_checked, read_tensors, select_prefix, strip_prefix


def _module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(4)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert norm.running_mean is not None
    norm.running_mean.uniform_(-1, 1)
    return module.eval()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrapper", ["plain", "prefixed", "nested"])
def test_state_dict_formats_round_trip(tmp_path: Path, wrapper: str) -> None:
    source = _module(1)
    state = source.state_dict()
    if wrapper == "prefixed":
        state = {f"module.{k}": v for k, v in state.items()}
    saved: object = {"state_dict": state, "epoch": 3} if wrapper == "nested" else state
    torch.save(saved, tmp_path / "w.pth")
    found = read_tensors(tmp_path / "w.pth")
    assert found.format == "state_dict"
    target = load_checked(_module(2), strip_prefix(found.tensors, ["module."]))
    assert _same(source, target)


def test_safetensors_and_torchscript(tmp_path: Path) -> None:
    source = _module(1)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    assert _same(source, load_checked(_module(2), read_tensors(tmp_path / "w.safetensors").tensors))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = source
            self.register_buffer("max_batch", torch.arange(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    traced = torch.jit.trace(Wrapper().eval(), torch.zeros(1, 3, 8, 8))
    for name in ("w.trcd", "w.pt"):  # a TorchScript archive is recognised whatever its suffix
        traced.save(str(tmp_path / name))
        found = read_tensors(tmp_path / name)
        assert found.format == "torchscript"
        assert "max_batch" in found.tensors
        assert _same(source, load_checked(_module(2), select_prefix(found.tensors, "model.")))


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_bad_files_are_invalid_checkpoints(tmp_path: Path) -> None:
    source = _module(1)
    torch.save(source.state_dict(), tmp_path / "good.pth")
    save_file(source.state_dict(), str(tmp_path / "good.safetensors"))
    torch.jit.trace(source, torch.zeros(1, 3, 8, 8)).save(str(tmp_path / "good.trcd"))
    cases = {
        "text.pth": b"definitely not a checkpoint\n",
        "empty.safetensors": b"",
        "cut.pth": (tmp_path / "good.pth").read_bytes()[:400],
        "cut.safetensors": (tmp_path / "good.safetensors").read_bytes()[:120],
        "cut.trcd": (tmp_path / "good.trcd").read_bytes()[:600],
        "evil.pth": pickle.dumps({"w": _Evil()}),
        "photo.jpg": b"\xff\xd8\xff\xe0",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidCheckpointError) as raised:
            read_tensors(tmp_path / name)
        assert raised.value.code == "invalid_checkpoint", name
        assert name in raised.value.message
    with pytest.raises(InvalidCheckpointError, match="no such file"):
        read_tensors(tmp_path / "absent.pth")


def test_strict_comparison_names_the_first_problem() -> None:
    good = _module(1).state_dict()
    missing = {k: v for k, v in good.items() if k != "1.running_var"}
    with pytest.raises(InvalidCheckpointError, match=r"missing key '1.running_var' \[4\]"):
        load_checked(_module(), missing)
    with pytest.raises(InvalidCheckpointError, match=r"unexpected key 'extra.weight'"):
        load_checked(_module(), {**good, "extra.weight": torch.zeros(2)})
    wrong = {**good, "3.weight": torch.zeros(2, 4, 3, 3)}
    with pytest.raises(InvalidCheckpointError, match=r"'3.weight' has shape \[2, 4, 3, 3\].*\[2, 4, 1, 1\]"):
        load_checked(_module(), wrong)
    with pytest.raises(InvalidCheckpointError, match="NaN"):
        load_checked(_module(), {**good, "0.bias": torch.full((4,), float("nan"))})
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in good.items()}
    assert load_checked(_module(), half).state_dict()["0.weight"].dtype == torch.float32


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_staged_entry_is_all_or_nothing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    with staged_entry("net", "v1", root) as staging:
        (staging / "model.onnx").write_bytes(b"one")
        (staging / "manifest.json").write_text("{}")
    before = _tree(root)
    assert set(before) == {"net/v1/model.onnx", "net/v1/manifest.json"}
    for name, version in [("net", "v1"), ("other", "v2")]:
        with pytest.raises(RuntimeError), staged_entry(name, version, root) as staging:
            (staging / "model.onnx").write_bytes(b"two")
            raise RuntimeError("parity failed")
        assert _tree(root) == before
        assert sorted(p.name for p in root.iterdir()) == ["net"]  # no staging or empty entry left
    with staged_entry("net", "v1", root) as staging:
        (staging / "model.onnx").write_bytes(b"three")
    assert _tree(root) == {"net/v1/model.onnx": b"three"}
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), staged_entry("net", "v1", fresh):
        raise RuntimeError("boom")
    assert not fresh.exists()
