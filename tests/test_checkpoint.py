"""student.ckpt: round trip, and a one-line error for every kind of bad file."""

import json
import pickle
import struct

import pytest
import torch

from engines.errors import InputError
from optimizer.checkpoint import (
    StudentCheckpoint,
    TeacherRef,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from optimizer.models import load_teacher


@pytest.fixture(scope="module")
def ckpt_path(tiny_teacher_dir, tmp_path_factory):
    t = load_teacher(tiny_teacher_dir)
    ck = StudentCheckpoint(
        "UNet2DModel",
        dict(t.model.config),
        "DDPMScheduler",
        dict(t.scheduler.config),
        t.schedule(4),
        TeacherRef(str(tiny_teacher_dir), t.weights_sha256),
        {"method": "none"},
    )
    return save_checkpoint(ck, t.model, tmp_path_factory.mktemp("ck") / "student.ckpt"), t


def test_round_trip(ckpt_path):
    path, teacher = ckpt_path
    ck = load_checkpoint(path)
    model = ck.build_model()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, teacher.model(x, t).sample)
    assert ck.schedule == teacher.schedule(4)
    assert ck.teacher.sha256 == teacher.weights_sha256
    assert not list(path.parent.glob("*.tmp"))  # atomic write left nothing behind


def _rewrite_meta(src, dst, **changes):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["dd_compile"])
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        elif isinstance(v, dict):
            meta[k] = {**meta[k], **v}
        else:
            meta[k] = v
    header["__metadata__"]["dd_compile"] = json.dumps(meta)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    return dst


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "too short"),
        ("pickle", "never unpickles"),
        ("torch_save", "never unpickles"),
        ("not_safetensors", "not a safetensors file"),
        ("truncated", "truncated"),
        ("version", "format version 99 is not supported"),
        ("model_class", "model class 'VQModel' is not supported"),
        ("no_meta", "lacks 'teacher'"),
    ],
)
def test_bad_files_get_one_line_errors(case, expect, ckpt_path, tmp_path):
    good, _ = ckpt_path
    p = tmp_path / "student.ckpt"
    if case == "directory":
        p.mkdir()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "pickle":
        p.write_bytes(pickle.dumps({"a": 1}))
    elif case == "torch_save":
        torch.save({"w": torch.zeros(2)}, p)
    elif case == "not_safetensors":
        p.write_bytes(b"hello world, this is text and not a checkpoint at all")
    elif case == "truncated":
        p.write_bytes(good.read_bytes()[:-1000])
    elif case == "version":
        _rewrite_meta(good, p, format_version=99)
    elif case == "model_class":
        _rewrite_meta(good, p, model={"class": "VQModel"})
    elif case == "no_meta":
        _rewrite_meta(good, p, teacher=None)
    with pytest.raises(InputError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert expect in msg and str(p) in msg and "\n" not in msg


def test_missing_tensor_and_shape_mismatch(ckpt_path, tmp_path):
    from safetensors.torch import load_file, save_file

    good, _ = ckpt_path
    meta = {"dd_compile": json.dumps(read_metadata(good))}
    tensors = load_file(str(good))
    name = sorted(tensors)[0]
    missing = dict(tensors)
    missing.pop(name)
    save_file(missing, str(tmp_path / "a.ckpt"), metadata=meta)
    with pytest.raises(InputError, match="missing"):
        load_checkpoint(tmp_path / "a.ckpt").build_model()
    wrong = dict(tensors)
    wrong[name] = torch.zeros(3, 3)
    save_file(wrong, str(tmp_path / "b.ckpt"), metadata=meta)
    with pytest.raises(InputError, match="has shape"):
        load_checkpoint(tmp_path / "b.ckpt").build_model()


def test_version_1_checkpoint_still_loads(ckpt_path, tmp_path):
    good, teacher = ckpt_path
    assert read_metadata(good)["format_version"] == 2
    old = _rewrite_meta(good, tmp_path / "v1.ckpt", format_version=1)
    ck = load_checkpoint(old)
    assert ck.pipeline is None and ck.schedule == teacher.schedule(4)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10.0])
    with torch.no_grad():
        assert torch.equal(ck.build_model()(x, t).sample, teacher.model(x, t).sample)
    # the pipeline field is a version-2 field: a version-1 file carrying it is refused
    bad = _rewrite_meta(old, tmp_path / "v1p.ckpt", pipeline=["x"])
    with pytest.raises(InputError, match="needs format version 2"):
        load_checkpoint(bad)
