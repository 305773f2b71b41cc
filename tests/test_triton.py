"""Triton model repository: configs parse against Triton's model_config.proto, match the ONNX
graph, pin versions; the sampler model ships the runtime's own sampler code."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.errors import InputError, IntegrityError
from engines.fileio import sha256_file
from engines.manifest import Manifest
from engines.triton import SAMPLER_MODEL, UNET_MODEL, main, write_triton_repo

mc = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="needs tritonclient (pip install 'tritonclient[grpc]') for Triton's model_config schema",
)
text_format = pytest.importorskip("google.protobuf.text_format")

FIXTURE = Path(__file__).parent / "data" / "runtime_fixture"
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64"}  # onnx.TensorProto enums


@pytest.fixture
def out(tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(FIXTURE, dest)
    return dest


def parse(path: Path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())  # raises on unknown fields


def graph_io(onnx_path: Path) -> dict[str, tuple[str, list]]:
    import onnx

    g = onnx.load(str(onnx_path)).graph
    out = {}
    for v in (*g.input, *g.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out[v.name] = (ONNX_TO_TRITON[t.elem_type], dims)
    return out


def test_unet_config_matches_onnx_graph(out, tmp_path):
    repo = write_triton_repo(out, tmp_path / "repo", precision="fp32")
    cfg = parse(repo / UNET_MODEL / "config.pbtxt")
    model = repo / UNET_MODEL / "1" / "model.onnx"
    assert cfg.name == UNET_MODEL and cfg.platform == "onnxruntime_onnx"
    assert cfg.default_model_filename == "model.onnx" and model.exists()
    assert cfg.max_batch_size == Manifest.load(out).io_spec.dims["batch"].max == 8
    io = graph_io(model)
    tensors = [*cfg.input, *cfg.output]
    assert sorted(t.name for t in tensors) == sorted(io)
    for t in tensors:
        want_type, want_dims = io[t.name]
        assert mc.DataType.Name(t.data_type) == want_type
        assert isinstance(want_dims[0], str)  # ONNX batch axis is dynamic; Triton drops it
        if want_dims[1:]:
            assert list(t.dims) == want_dims[1:] and not t.HasField("reshape")
        else:  # timestep [batch]: dims [1] reshaped to [] for the model
            assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []
    assert list(cfg.version_policy.specific.versions) == [1]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [1, 8]
    assert cfg.instance_group[0].count == 1
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["dd_artifact_sha256"] == sha256_file(model)
    assert params["dd_validated_onnxruntime"]
    readme = (repo / "README.md").read_text()
    assert f"tritonserver --model-repository={repo.resolve()}" in readme
    assert f"onnxruntime {params['dd_validated_onnxruntime']}" in readme and "opset 20" in readme


def test_sampler_model_ships_the_runtime_sampler(out, tmp_path):
    repo = write_triton_repo(out, tmp_path / "repo", precision="fp32")
    cfg = parse(repo / SAMPLER_MODEL / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 8
    assert list(cfg.version_policy.specific.versions) == [1]
    ins = {t.name: t for t in cfg.input}
    assert set(ins) == {"seed", "noise"} and all(t.optional for t in ins.values())
    assert mc.DataType.Name(ins["seed"].data_type) == "TYPE_INT64"
    assert list(ins["noise"].dims) == [1, 8, 8]
    (images,) = cfg.output
    assert images.name == "images" and list(images.dims) == [1, 8, 8]
    vdir = repo / SAMPLER_MODEL / "1"
    src = Path(__file__).parents[1] / "engines"
    assert (vdir / "dd_schedule.py").read_text() == (src / "schedule.py").read_text()
    assert (vdir / "model.py").read_text() == (src / "triton_sampler_model.py").read_text()
    compile((vdir / "model.py").read_text(), "model.py", "exec")
    settings = json.loads((vdir / "sampler.json").read_text())
    m = Manifest.load(out)
    assert settings["schedule"] == m.schedule.to_dict() and settings["unet_model"] == UNET_MODEL
    assert settings["unet_output"] == "out_sample" and settings["max_batch"] == 8


def test_consistency_sampler_takes_step_noise(out, tmp_path):
    m = Manifest.load(out)
    from dataclasses import replace

    m.schedule = replace(m.schedule, kind="consistency")
    m.save()
    repo = write_triton_repo(out, tmp_path / "repo", precision="fp32")
    ins = {t.name: t for t in parse(repo / SAMPLER_MODEL / "config.pbtxt").input}
    assert list(ins["step_noise"].dims) == [m.schedule.steps - 1, 1, 8, 8]


def test_preferred_batch_sizes_from_bench_json(out, tmp_path):
    bench = tmp_path / "bench.json"
    # throughput: 100, 200, 210 images/s -> sizes within 10% of the best: 4 and 8; 16 > max
    bench.write_text(
        json.dumps(
            {
                "results": [
                    {"batch": 1, "median_ms": 10.0},
                    {"batch": 4, "median_ms": 20.0},
                    {"batch": 8, "median_ms": 38.0},
                    {"batch": 16, "median_ms": 10.0},
                ]
            }
        )
    )
    repo = write_triton_repo(out, tmp_path / "repo", precision="fp32", bench_json=bench)
    cfg = parse(repo / UNET_MODEL / "config.pbtxt")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    bench.write_text(json.dumps({"nothing": 1}))
    with pytest.raises(InputError, match="no entries with a batch size"):
        write_triton_repo(out, tmp_path / "repo", precision="fp32", bench_json=bench)


def test_tensorrt_plan_pins_version_and_compute_capability(out, tmp_path):
    m = Manifest.load(out)
    plan = out / "engines" / "student.fp16.plan"
    plan.parent.mkdir()
    plan.write_bytes(np.random.default_rng(0).bytes(256))  # config generation never reads it
    m.add(
        "engine/fp16",
        plan,
        "engine",
        precision="fp16",
        backend="tensorrt",
        target={"tensorrt": "10.8.0.43", "compute_capability": "8.9", "gpu": "NVIDIA L4", "cuda": "12.8"},
    )
    m.save()
    with pytest.raises(InputError, match="'engine/fp16' is not servable: not validated by run"):
        write_triton_repo(out, tmp_path / "repo", precision="fp16", backend="tensorrt")
    # the planted engine was never validated: exported only on request, and the repo says so
    repo = write_triton_repo(
        out, tmp_path / "repo", precision="fp16", backend="tensorrt", allow_unvalidated=True
    )
    cfg = parse(repo / UNET_MODEL / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and (repo / UNET_MODEL / "1" / "model.plan").exists()
    assert dict(cfg.cc_model_filenames) == {"8.9": "model.plan"}
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["dd_tensorrt_version"] == "10.8.0.43" and params["dd_compute_capability"] == "8.9"
    assert mc.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"
    readme = (repo / "README.md").read_text()
    assert "TensorRT **10.8.0.43**" in readme and "compute capability **8.9**" in readme
    assert params["dd_allow_unvalidated"] == "true" and "**allow_unvalidated: true**" in readme


def test_errors_and_atomic_replace(out, tmp_path, capsys):
    repo = tmp_path / "repo"
    write_triton_repo(out, repo, precision="fp32")
    (repo / "stale.txt").write_text("from an older run")
    write_triton_repo(out, repo, precision="fp32")  # replaces the whole folder
    assert not (repo / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "repo"]  # no temp folders left
    with pytest.raises(InputError, match="no onnx for precision 'int8'"):
        write_triton_repo(out, repo, precision="int8")
    onnx = out / "onnx" / "student.fp32.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="sha256"):
        write_triton_repo(out, tmp_path / "other", precision="fp32")
    assert not (tmp_path / "other").exists()
    with pytest.raises(SystemExit) as e:
        main([str(out), "--repo", str(tmp_path / "cli"), "--precision", "fp32"])
    assert e.value.code == 2 and "sha256" in capsys.readouterr().err


def test_cli_writes_repository(out, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(out), "--repo", str(tmp_path / "cli"), "--precision", "fp32", "--instances", "2"])
    assert e.value.code == 0
    cfg = parse(tmp_path / "cli" / UNET_MODEL / "config.pbtxt")
    assert cfg.instance_group[0].count == 2
