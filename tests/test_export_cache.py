"""The export cache (optimizer/compile/export_cache.py): a hit gives the same graph without
exporting, anything the graph depends on changes the key, a damaged entry is exported again."""

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.iospec import DimRange, IOSpec, TensorSpec
from optimizer.compile import export_cache
from optimizer.compile.export import ExportConfig, write_onnx

SPEC = IOSpec(
    "test",
    (TensorSpec("sample", "float32", ("batch", 2, 4, 4)),),
    (TensorSpec("out_sample", "float32", ("batch", 2, 4, 4)),),
    {"batch": DimRange(1, 2, 4)},
)


class Scaled(torch.nn.Module):
    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.scale = scale  # a plain attribute forward() reads: part of the key

    def forward(self, sample):
        return self.conv(sample) * self.scale


def _export(model: torch.nn.Module, path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    x = torch.randn(2, 2, 4, 4)
    write_onnx(model, (x,), {}, SPEC, {"sample": {0: batch}}, path, ExportConfig(check=False))


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"sample": x})[0]


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv(export_cache.ENV, raising=False)  # the suite's shared cache is not this one
    with export_cache.using(tmp_path / "cache"):
        yield tmp_path / "cache"


def _entries(cache) -> list:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def test_hit_gives_the_same_graph_without_exporting(cache, tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    m = Scaled()
    _export(m, tmp_path / "a" / "g.onnx")
    assert len(_entries(cache)) == 1

    def no_export(*a, **k):
        raise AssertionError("exported although the cache holds this graph")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    with caplog.at_level(logging.INFO, logger="optimizer.compile.export_cache"):
        _export(m, tmp_path / "b" / "g.onnx")
    assert "cached graph reused" in caplog.text
    assert (tmp_path / "a" / "g.onnx").read_bytes() == (tmp_path / "b" / "g.onnx").read_bytes()
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32)
    ref = m(torch.from_numpy(x)).detach().numpy()
    assert np.abs(_run(tmp_path / "b" / "g.onnx", x) - ref).max() < 1e-5


def test_weights_attributes_and_names_change_the_key(cache, tmp_path):
    torch.manual_seed(0)
    m = Scaled()
    _export(m, tmp_path / "g.onnx")
    with torch.no_grad():
        m.conv.weight[0, 0, 0, 0] += 1e-3  # one weight
    _export(m, tmp_path / "g.onnx")
    m.scale = 3.0  # a plain attribute, no weight
    _export(m, tmp_path / "g.onnx")
    x = np.ones((1, 2, 4, 4), np.float32)
    assert np.allclose(_run(tmp_path / "g.onnx", x), m(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    _export(m, tmp_path / "h.onnx")  # external data is named after the file
    assert len(_entries(cache)) == 4


def test_damaged_entry_is_exported_again_and_replaced(cache, tmp_path, caplog):
    torch.manual_seed(0)
    m = Scaled()
    _export(m, tmp_path / "a.onnx")
    (entry,) = [cache / e for e in _entries(cache)]
    graph = entry / "a.onnx"
    graph.write_bytes(graph.read_bytes()[:-8])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="optimizer.compile.export_cache"):
        _export(m, tmp_path / "b" / "a.onnx")
    assert "damaged" in caplog.text
    x = np.ones((2, 2, 4, 4), np.float32)
    assert np.allclose(_run(tmp_path / "b" / "a.onnx", x), m(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert export_cache._sound(entry, "a.onnx")  # the re-export replaced the entry
    assert not any(p.name.startswith(".tmp-") for p in cache.iterdir())


def test_off_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(export_cache.ENV, raising=False)
    with export_cache.using(None):
        assert export_cache.cache_dir() is None
        _export(Scaled(), tmp_path / "g.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["g.onnx"]
    monkeypatch.setenv(export_cache.ENV, str(tmp_path / "env"))
    assert export_cache.cache_dir() == tmp_path / "env"


def test_a_folder_the_cache_did_not_write_is_never_deleted(cache, tmp_path, caplog):
    """A user's folder that happens to sit at an entry's name (no entry.json): left as it was."""
    torch.manual_seed(0)
    m = Scaled()
    _export(m, tmp_path / "a.onnx")
    (entry,) = [cache / e for e in _entries(cache)]
    import shutil

    shutil.rmtree(entry)
    entry.mkdir()
    (entry / "mine.txt").write_text("a user's file")
    with caplog.at_level(logging.WARNING, logger="optimizer.compile.export_cache"):
        _export(m, tmp_path / "b" / "a.onnx")  # the same graph (its key names the file)
    assert "not a cache entry" in caplog.text
    assert [p.name for p in entry.iterdir()] == ["mine.txt"]
    assert not any(p.name.startswith(".tmp-") for p in cache.iterdir())


def test_the_same_weights_from_another_folder_hit(cache, tmp_path):
    """Where a module was loaded from (diffusers' `_name_or_path`, transformers' `name_or_path`) is
    not part of the graph: a copied pipeline folder (a test's own tmp dir, a moved checkout) hits,
    while a config value that changes forward() still misses."""
    import shutil

    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from optimizer.compile.export_cache import key
    from tests.t2i_tiny import make_tiny_pipeline

    a = make_tiny_pipeline(tmp_path / "a")
    shutil.copytree(a, tmp_path / "b")
    vaes = [AutoencoderKL.from_pretrained(p / "vae") for p in (a, tmp_path / "b")]
    tes = [CLIPTextModel.from_pretrained(p / "text_encoder") for p in (a, tmp_path / "b")]
    assert vaes[0].config._name_or_path != vaes[1].config._name_or_path
    assert tes[0].name_or_path != tes[1].name_or_path
    ex = {"sample": torch.zeros(1, 3, 16, 16)}
    ids = {"input_ids": torch.zeros(1, 77, dtype=torch.int64)}
    assert key(vaes[0], ex, {}) == key(vaes[1], ex, {})
    assert key(tes[0], ids, {}) == key(tes[1], ids, {})
    vaes[1].register_to_config(scaling_factor=0.5)  # a config value forward() reads
    assert key(vaes[0], ex, {}) != key(vaes[1], ex, {})


def test_a_unet_keys_the_same_in_every_process(tmp_path):
    """diffusers' `_use_default_values` is a list made from a set: its order follows the hash seed,
    and it made every dd-compile run export the UNet again. The key is the same under two seeds."""
    import os
    import subprocess
    import sys

    from tests.t2i_tiny import make_tiny_pipeline

    src = make_tiny_pipeline(tmp_path / "pipe")
    # the loader's own UNet: its Transformer2DModel blocks record the config defaults diffusers
    # filled in as `_use_default_values`
    code = (
        "import torch; from optimizer.t2i.load import load_pipeline;"
        "from optimizer.compile.export_cache import key;"
        f"m = load_pipeline({str(src)!r}).module('unet');"
        "d = [x._internal_dict['_use_default_values'] for x in m.modules()"
        " if '_use_default_values' in getattr(x, '_internal_dict', {})];"
        "print(d[0]); print(key(m, {'s': torch.zeros(1)}, {}))"
    )
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(res.stdout.strip().splitlines()[-2:])
    assert outs[0][0] != outs[1][0], "the two seeds happened to order the set alike: pick others"
    assert outs[0][1] == outs[1][1]
