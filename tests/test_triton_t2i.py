"""Triton model repository of a text-to-image pipeline: component configs parse against Triton's
model_config.proto and match their ONNX graphs; the dd_t2i Python model ships the runtime's own
pipeline code; the folder rule and the validation rule hold; the serve-side checks of a prompt
request (token limit, seeds, steps, guidance) are the runtime's."""

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.errors import InputError
from engines.t2i import T2IRequest, TextToImagePipeline
from engines.triton import main, write_triton_repo
from engines.triton_t2i import PIPELINE_MODEL, VENDORED, served_models
from tests.test_triton import graph_io, parse

pytestmark = pytest.mark.slow  # the session's tiny pipeline export takes ~30 s on one core


def test_component_configs_match_their_graphs(t2i_folder, tmp_path):
    repo = write_triton_repo(t2i_folder, tmp_path / "repo", allow_unvalidated=True)
    pipe = TextToImagePipeline(t2i_folder)
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(
        ["dd_t2i", "dd_text_encoder", "dd_unet", "dd_vae_decoder", "dd_vae_encoder"]
    )
    for name, model in served_models(pipe).items():
        cfg = parse(repo / model / "config.pbtxt")
        onnx_path = repo / model / "1" / "model.onnx"
        assert cfg.name == model and cfg.platform == "onnxruntime_onnx" and onnx_path.exists()
        assert cfg.max_batch_size == pipe.specs[name].dims["batch"].max
        io = graph_io(onnx_path)
        tensors = [*cfg.input, *cfg.output]
        assert sorted(t.name for t in tensors) == sorted(io)
        for t in tensors:
            want_type, graph_dims = io[t.name]
            assert mc_type(t) == want_type, t.name
            got, graph = list(t.dims), graph_dims[1:]
            if not graph:  # the [batch] timestep: dims [1] + reshape []
                assert got == [1] and list(t.reshape.shape) == [], t.name
                continue
            assert len(got) == len(graph), t.name
            for g, d in zip(got, graph, strict=True):
                # a fixed axis keeps its size; a symbolic one is -1 unless its range is one size (tokens)
                assert g == d if isinstance(d, int) and d > 0 else g in (-1, 77), (t.name, got, graph)
    assert [t.dims for t in parse(repo / "dd_unet" / "config.pbtxt").input if t.name == "sample"][0] == [
        4,
        -1,
        -1,
    ]  # latent height and width stay dynamic


def mc_type(t) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.DataType.Name(t.data_type)


def test_pipeline_model_ships_the_runtime_code(t2i_folder, tmp_path):
    repo = write_triton_repo(t2i_folder, tmp_path / "repo", allow_unvalidated=True)
    cfg = parse(repo / PIPELINE_MODEL / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 4  # UNet max 8 at the CFG batch
    ins = {t.name: (mc_type(t), list(t.dims), t.optional) for t in cfg.input}
    assert ins == {
        "prompt": ("TYPE_STRING", [1], False),
        "seed": ("TYPE_INT64", [1], False),
        "negative_prompt": ("TYPE_STRING", [1], True),
        "guidance_scale": ("TYPE_FP32", [1], True),
        "num_inference_steps": ("TYPE_INT32", [1], True),
        # the output has a VAE encoder: image requests, whose output takes the image's size
        "image": ("TYPE_UINT8", [-1, -1, 3], True),
        "mask_image": ("TYPE_UINT8", [-1, -1], True),
        "strength": ("TYPE_FP32", [1], True),
    }
    assert [(t.name, mc_type(t), list(t.dims)) for t in cfg.output] == [("image", "TYPE_UINT8", [-1, -1, 3])]
    version = repo / PIPELINE_MODEL / "1"
    engines_dir = Path(__file__).parents[1] / "engines"
    for name in VENDORED:  # byte-identical copies: the served pipeline is the runtime's
        assert (version / "engines" / name).read_bytes() == (engines_dir / name).read_bytes()
    assert (version / "model.py").read_bytes() == (engines_dir / "triton_t2i_model.py").read_bytes()
    settings = json.loads((version / "t2i_model.json").read_text())
    models = served_models(copied_sd(t2i_folder))
    assert settings == {"models": models, "max_batch": 4, "long_prompts": "refuse"}
    # the description is rebuilt from the pipeline's own config: for an export, the same file
    rebuilt = json.loads((version / "pipeline" / "t2i.json").read_text())
    assert rebuilt == json.loads((t2i_folder / "t2i.json").read_text())
    # the copied pipeline folder is enough for the runtime's tokenizer and scheduler
    copied = TextToImagePipeline(version / "pipeline", runner_factory=lambda n, p, s: None)
    assert (
        copied.tokenizer(["a red seven"]).tolist()
        == TextToImagePipeline(t2i_folder).tokenizer(["a red seven"]).tolist()
    )
    marker = json.loads((repo / ".dd-compile.json").read_text())
    assert marker["kind"] == "triton-repo" and marker["allow_unvalidated"] is True
    assert "allow_unvalidated" in (repo / "README.md").read_text()


def test_unvalidated_folder_and_user_folder_are_refused(t2i_folder, tmp_path, capsys):
    with pytest.raises(InputError, match="no dd-compile run validated; compile it with dd-compile"):
        write_triton_repo(t2i_folder, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main([str(t2i_folder), "--repo", str(user), "--allow-unvalidated"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not written by dd-compile" in err
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    # a repository dd-triton wrote is replaced
    repo = write_triton_repo(t2i_folder, tmp_path / "repo", allow_unvalidated=True)
    (repo / "dd_unet" / "stale").write_text("x")
    write_triton_repo(t2i_folder, repo, allow_unvalidated=True)
    assert not (repo / "dd_unet" / "stale").exists()
    with pytest.raises(InputError, match="onnxruntime models only"):
        write_triton_repo(t2i_folder, tmp_path / "r2", backend="tensorrt", allow_unvalidated=True)


def test_request_checks_before_any_component_runs(t2i_folder, caplog):
    refuse = TextToImagePipeline(t2i_folder, long_prompts="refuse")
    long = "seven " * 80  # 80 tokens + BOS + EOS
    with pytest.raises(InputError, match=r"^prompt 0: 82 tokens \(with BOS and EOS\), over the limit of 77"):
        refuse.check([long], seeds=[0])
    with pytest.raises(InputError, match=r"^negative_prompt 1: 82 tokens"):  # negatives are checked too
        refuse.check(["a", "b"], negative_prompt=["", long], seeds=[0, 1])
    for kw, msg in (
        (dict(seeds=[-1]), r"seeds: -1 is not an integer in \[0, 2\^63 - 1\]"),
        (dict(seeds=[1.5]), "seeds: 1.5 is not an integer"),
        (dict(seeds=[1, 2]), "seeds: 2 seeds for 1 prompts"),
        (dict(seeds=[0], num_inference_steps=0), r"num_inference_steps=0: must be in \[1, 1000\]"),
        (dict(seeds=[0], guidance_scale=float("nan")), "guidance_scale=nan: must be a finite number"),
    ):
        with pytest.raises(InputError, match=msg):
            refuse.check(["a red seven"], **kw)
    assert len(refuse.check(["a"] * 5, seeds=list(range(5))).prompts) == 5  # run() chunks at 4
    r = refuse.check([""], seeds=[3], num_inference_steps=2)  # the empty prompt is a prompt
    assert (r.prompts, r.seeds, r.num_inference_steps, r.guidance_scale) == ([""], [3], 2, 7.5)
    # the library default stays diffusers': cut to 77 tokens, EOS kept, a warning logged
    with TextToImagePipeline(t2i_folder) as truncating, caplog.at_level(logging.WARNING, "engines.tokenizer"):
        truncating.check([long], seeds=[0])
        assert "truncated to 77 tokens" in caplog.text
        with pytest.raises(InputError, match="82 tokens"):
            with refuse:
                refuse([long], seeds=[0], num_inference_steps=2)


def test_openvino_components_give_the_onnxruntime_images(t2i_folder):
    pytest.importorskip("openvino", reason="openvino not installed: pip install 'dd-compile[openvino]'")
    with (
        TextToImagePipeline(t2i_folder, threads=1) as ort,
        TextToImagePipeline(t2i_folder, backend="openvino", threads=1) as ov,
    ):
        kw = dict(seeds=[0, 1], num_inference_steps=3)
        a, b = ort(["a red seven", ""], **kw), ov(["a red seven", ""], **kw)
    assert a.shape == b.shape == (2, 16, 16, 3)
    assert np.abs(a.astype(int) - b).max() <= 1  # same fp32 graphs; rounding may move one level


def test_copied_folder_needs_no_graphs(t2i_folder, tmp_path):
    """dd_t2i's pipeline/ folder holds no ONNX graph: only a runner factory that never opens one."""
    repo = write_triton_repo(t2i_folder, tmp_path / "repo", allow_unvalidated=True)
    folder = repo / PIPELINE_MODEL / "1" / "pipeline"
    assert not (folder / "onnx").exists()
    with pytest.raises(InputError, match="unet graph not found|text_encoder graph not found"):
        TextToImagePipeline(folder)
    shutil.rmtree(repo)


class _FakeTensor:
    def __init__(self, name, arr):
        self._name, self._arr = name, np.asarray(arr)

    def as_numpy(self):
        return self._arr


class _FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.err = list(output_tensors), error

    def has_error(self):
        return self.err is not None

    def error(self):
        return self.err


class _FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, msg, code=None):
        self.msg, self.code = msg, code

    def message(self):
        return self.msg


def fake_pb_utils(runners: dict, unet_batches: list):
    """triton_python_backend_utils, enough for dd_t2i: BLS requests go to local ONNX Runtime runners."""
    import types

    from engines.triton_t2i import COMPONENT_MODELS

    by_model = {m: runners[n] for n, m in COMPONENT_MODELS.items() if n in runners}

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names):
            self.model, self.inputs = model_name, inputs

        def exec(self):
            r = by_model[self.model]
            feeds = {t._name: t.as_numpy() for t in self.inputs}
            feeds = {k: v.reshape(-1) if len(r.spec.input(k).shape) == 1 else v for k, v in feeds.items()}
            if self.model in ("dd_unet", "dd_transformer"):
                unet_batches.append(feeds["sample"].shape[0])
            return _FakeResponse([_FakeTensor(k, v) for k, v in r.infer(feeds).items()])

    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.InferenceRequest = _FakeTensor, _FakeResponse, InferenceRequest
    m.TritonError, m.TritonModelException = _FakeError, RuntimeError
    m.get_input_tensor_by_name = lambda req, name: None if name not in req else _FakeTensor(name, req[name])
    m.get_output_tensor_by_name = lambda resp, name: next(t for t in resp.output_tensors if t._name == name)
    return m


def copied_sd(folder):
    return TextToImagePipeline(folder, runner_factory=lambda n, p, s: None)


def pipeline_model(repo: Path, runners: dict, monkeypatch, denoiser_batches: list):
    """dd_t2i's TritonPythonModel from `repo`, initialized, its BLS requests answered by `runners`."""
    import importlib.util
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # model.py prepends its folder
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(runners, denoiser_batches))
    spec = importlib.util.spec_from_file_location("dd_t2i_model", repo / PIPELINE_MODEL / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({})
    return model


def request(prompts, seeds, steps=None, negative=None, image=None, mask=None, strength=None):
    """One dd_t2i request as the Triton client sends it ([B, 1] tensors; image [B, H, W, 3] and
    mask [B, H, W] as given)."""
    r = {"prompt": np.array([[p] for p in prompts], object), "seed": np.array(seeds, np.int64)[:, None]}
    if steps is not None:
        r["num_inference_steps"] = np.full((len(seeds), 1), steps, np.int32)
    if negative is not None:
        r["negative_prompt"] = np.array([[n] for n in negative], object)
    if image is not None:
        r["image"] = image
    if mask is not None:
        r["mask_image"] = mask
    if strength is not None:
        r["strength"] = np.full((len(seeds), 1), strength, np.float32)
    return r


def test_pipeline_model_answers_each_request_of_a_merged_batch(t2i_folder, tmp_path, monkeypatch):
    """dd_t2i's execute() on one dynamic batch of five requests: the two good ones with the same
    step count run as one pipeline call (UNet at the CFG batch 2 x 3 images), the third good one
    alone, and the bad ones (over-limit prompt, non-UTF-8, negative seed) get their own
    INVALID_ARG; every image equals the runtime's."""
    repo = write_triton_repo(t2i_folder, tmp_path / "repo", allow_unvalidated=True)
    unet_batches: list[int] = []
    with TextToImagePipeline(t2i_folder, threads=1) as local:
        model = pipeline_model(repo, local.runners, monkeypatch, unet_batches)
        req = request
        requests = [
            req([b"a red seven"], [1], 2),
            req([("seven " * 80).encode()], [2], 2),
            req([b"", b"green seven"], [3, 4], 2),
            req([b"a \xff"], [5], 2),
            req([b"red"], [-6], 2),
            req([b"red"], [6], 3),
        ]
        responses = model.execute(requests)
        want = {
            0: local(["a red seven"], seeds=[1], num_inference_steps=2),
            2: local(["", "green seven"], seeds=[3, 4], num_inference_steps=2),
            5: local(["red"], seeds=[6], num_inference_steps=3),
        }
    assert len(responses) == len(requests)
    for i, r in enumerate(responses):
        if i in want:
            assert r.err is None, (i, r.err and r.err.msg)
            (image,) = r.output_tensors
            assert image._name == "image" and np.array_equal(image.as_numpy(), want[i])
        else:
            assert r.err.code == "INVALID_ARG" and "\n" not in r.err.msg
    assert [responses[i].err.msg.split(":")[0] for i in (1, 3, 4)] == ["prompt 0", "prompt 0", "seeds"]
    # requests 0 and 2 (2 steps) ran together: 2 UNet calls at batch 2 x 3 (CFG); request 5 alone
    assert unet_batches == [6, 6, 2, 2, 2]


def test_pipeline_model_answers_image_requests_and_refuses_bad_ones_alone(t2i_folder, tmp_path, monkeypatch):
    """dd_t2i's execute() on one dynamic batch of image-to-image, inpainting and text requests and
    bad image requests: every image is the runtime's pipe(prompt, image=, mask_image=, strength=,
    seeds=) (identical uint8; the two 16x16 image-to-image requests ran as one call, compared with
    the runtime on that batch), and each bad image, mask or strength fails alone with one line."""
    from tests.test_img2img import test_images
    from tests.test_inpaint import test_masks

    repo = write_triton_repo(t2i_folder, tmp_path / "repo", allow_unvalidated=True)
    img, wide, mask = test_images(3, 16, 16, seed=3), test_images(1, 24, 32, seed=4), test_masks(1, 16, 16)
    req = request
    requests = [
        req([b"a red seven", b"green"], [1, 2], 4, image=img[:2], strength=0.6),
        req([b"red"], [9], 4, image=img[:1].astype(np.float32), strength=0.6),
        req([b"red seven"], [3], 4, image=wide, strength=0.6),
        req([b"red"], [9], 4, image=test_images(1, 17, 16, seed=5)),
        req([b"seven"], [4], 4),
        req([b"red"], [9], 4, image=img[:1, :, :, :2]),
        req([b"a green seven"], [5], 4, image=img[2:], mask=mask, strength=0.75),
        req([b"red"], [9], 4, image=img[:1], mask=np.zeros((1, 16, 24), np.uint8)),
        req([b"seven"], [6], 4, image=img[2:], strength=0.6),
        req([b"red"], [9], 4, image=img[:1], strength=1.5),
        req([b"red"], [9], 4, image=img[:1], strength=0.0),
        req([b"red"], [9], 4, strength=0.5),
        req([b"red"], [9], 4, mask=mask),
    ]
    refused = {
        1: r"^image: expected uint8 \(HWC or NHWC\), got float32$",
        3: r"^image 17x16: height=17: must be a multiple of 2 in \[16, 32\]",
        5: r"^image: 2 channels, expected 3",
        7: r"^mask_image: 16x24, the image is 16x16",
        9: r"^strength=1.5: must be in \(0, 1\]$",
        10: r"^strength=0.0: must be in \(0, 1\]$",
        11: r"^strength: only with image=",
        12: r"^mask_image: only with image=",
    }
    unet_batches: list[int] = []
    with TextToImagePipeline(t2i_folder, threads=1) as local:
        model = pipeline_model(repo, local.runners, monkeypatch, unet_batches)
        responses = model.execute(requests)
        kw = dict(num_inference_steps=4)
        merged = local(["a red seven", "green", "seven"], image=img, strength=0.6, seeds=[1, 2, 6], **kw)
        want = {
            0: merged[:2],
            2: local(["red seven"], image=wide, strength=0.6, seeds=[3], **kw),
            4: local(["seven"], seeds=[4], **kw),
            6: local(["a green seven"], image=img[2:], mask_image=mask, strength=0.75, seeds=[5], **kw),
            8: merged[2:],
        }
        alone = local(["a red seven", "green"], image=img[:2], strength=0.6, seeds=[1, 2], **kw)
        unmasked = local(["a green seven"], image=img[2:], strength=0.75, seeds=[5], **kw)
    assert sorted([*want, *refused]) == list(range(len(requests)))
    for i, pattern in refused.items():
        err = responses[i].err
        assert err is not None and err.code == "INVALID_ARG", (i, err)
        assert "\n" not in err.msg and re.search(pattern, err.msg), (i, err.msg)
    for i, w in want.items():
        assert responses[i].err is None, (i, responses[i].err.msg)
        (image,) = responses[i].output_tensors
        assert image.as_numpy().shape == w.shape and np.array_equal(image.as_numpy(), w), i
    assert want[2].shape == (1, 24, 32, 3)  # an image request's output takes its image's size
    assert np.abs(alone.astype(int) - merged[:2]).max() <= 1  # the batch changes no image (rounding)
    assert np.abs(unmasked.astype(int) - want[6]).max() > 8  # the mask is used
    # one call per batch key: img2img 16x16 (3 images: 2 of 4 steps at strength 0.6, CFG batch 6),
    # img2img 24x32, text (4 steps), inpainting (3 steps at 0.75)
    assert unet_batches == [6, 6, 2, 2, 2, 2, 2, 2, 2, 2, 2]


def test_image_request_checks_run_no_component(t2i_folder, tmp_path):
    """TextToImagePipeline.check with image / mask_image / strength: the runtime's image checks
    with no runner to call (a server checks a request before any component runs), the request kept
    as uint8 NHWC + 0/255 NHW masks whatever form came in, the family's default strengths filled
    in; an output without a VAE encoder gets no image inputs in its Triton config."""
    from tests.test_img2img import test_images
    from tests.test_inpaint import test_masks

    pipe = copied_sd(t2i_folder)  # runners None: running anything would fail
    img, mask = test_images(2, 16, 16, seed=1), test_masks(2, 16, 16)
    for kw, msg in (
        (dict(image=img[:1].astype(np.float32)), "image: expected uint8"),
        (dict(image=test_images(1, 16, 64, seed=0)), "image 16x64: width=64: must be a multiple of 2"),
        (dict(image=img[:1], strength=0.1), "no step left"),
        (dict(image=img, mask_image=mask[:1]), "image: 2 image(s) for 1 prompt(s)"),
        (dict(image=img[:1], mask_image=mask[:1, :8]), "mask_image: 8x16, the image is 16x16"),
        (dict(image=img[:1], mask_image=mask[:1].astype(np.float32)), "mask_image: expected uint8 or bool"),
    ):
        with pytest.raises(InputError) as e:
            pipe.check(["a red seven"], seeds=[0], num_inference_steps=4, **kw)
        assert msg in str(e.value) and "\n" not in str(e.value), (list(kw), str(e.value))
    r = pipe.check(["a", "b"], seeds=[0, 1], image=list(img), mask_image=mask >= 128)
    assert r.image.dtype == np.uint8 and np.array_equal(r.image, img)
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1), 3, axis=-1)  # every level
    assert np.array_equal(pipe.check(["a"], seeds=[0], image=ramp).image, ramp)
    assert np.array_equal(r.mask_image, np.where(mask >= 128, 255, 0).astype(np.uint8))
    assert r.strength == 1.0 and pipe.check(["a"], seeds=[0], image=img[0]).strength == 0.8
    assert r.batch_key == (7.5, r.num_inference_steps, (16, 16), 1.0, True, "")  # "": no adapters
    assert pipe.check(["a"], seeds=[0]).image is None
    # a server merges requests with the same batch key, in order
    m = T2IRequest.merge([r, pipe.check(["c"], seeds=[2], image=img[:1], mask_image=mask[:1])])
    assert (m.prompts, m.seeds) == (["a", "b", "c"], [0, 1, 2])
    assert m.image.shape == (3, 16, 16, 3) and m.mask_image.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="batch_key"):
        T2IRequest.merge([r, pipe.check(["c"], seeds=[2], image=img[:1])])
    # an output compiled before image-to-image: text requests only, at the compiled size
    old = tmp_path / "old"
    shutil.copytree(t2i_folder, old)
    t2i = json.loads((old / "t2i.json").read_text())
    del t2i["components"]["vae_encoder"]
    (old / "t2i.json").write_text(json.dumps(t2i))
    repo = write_triton_repo(old, tmp_path / "repo", allow_unvalidated=True)
    cfg = parse(repo / PIPELINE_MODEL / "config.pbtxt")
    assert "image" not in {t.name for t in cfg.input} and not (repo / "dd_vae_encoder").exists()
    assert [list(t.dims) for t in cfg.output] == [[16, 16, 3]]


def check_served_family(out: Path, tmp_path: Path, monkeypatch, models: list[str], negative: bool) -> None:
    """dd-triton on another family's output: one model per component the family has (named
    `models`), the description read back unchanged, and dd_t2i's images (requests with and without
    a negative prompt, merged into one batch) equal to the runtime's."""
    repo = write_triton_repo(out, tmp_path / "repo", allow_unvalidated=True)
    if "vae_encoder" in json.loads((out / "t2i.json").read_text())["components"]:
        models = [*models, "dd_vae_encoder"]  # compiled for image requests too
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted([PIPELINE_MODEL, *models])
    for m in models:
        assert parse(repo / m / "config.pbtxt").name == m
    version = repo / PIPELINE_MODEL / "1"
    assert json.loads((version / "pipeline" / "t2i.json").read_text()) == json.loads(
        (out / "t2i.json").read_text()
    )
    assert json.loads((version / "t2i_model.json").read_text())["models"] == {m[3:]: m for m in models}
    batches: list[int] = []
    with TextToImagePipeline(out, threads=1) as local:
        model = pipeline_model(repo, local.runners, monkeypatch, batches)
        requests = [request([b"a red seven", b""], [1, 2], 2)]
        want = [local(["a red seven", ""], seeds=[1, 2], num_inference_steps=2)]
        if negative:
            requests.append(request([b"green"], [3], 2, negative=[b"blue"]))
            want.append(local(["green"], ["blue"], seeds=[3], num_inference_steps=2))
        responses = model.execute(requests)
    for r, w in zip(responses, want, strict=True):
        assert r.err is None, r.err and r.err.msg
        assert np.array_equal(r.output_tensors[0].as_numpy(), w)
    assert len(batches) == 2  # the requests ran as one call: one denoiser batch per step
