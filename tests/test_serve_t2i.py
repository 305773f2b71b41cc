"""dd-serve for a text-to-image folder, for real: PyTriton's tritonserver on 127.0.0.1, prompts in
over HTTP and gRPC, uint8 images out; one server for the module.

Concurrent prompt requests must give exactly the runtime's images (TextToImagePipeline on the same
folder and seeds, max |diff| <= 1 uint8 level: the server batches requests the runtime ran alone);
each bad request (a prompt over the token limit, non-UTF-8 bytes, a wrong dtype, a batch over the
maximum, a negative seed, a missing seed; an image not uint8, of 2 channels or of a size the VAE
factor does not divide, a mask of another size, a strength outside (0, 1]) gets HTTP 400 / gRPC
INVALID_ARGUMENT with a one-line reason while the server stays up; the empty prompt is a prompt
(the runtime's image for ""); image-to-image and inpainting requests give the runtime's images.
Needs the serve venv (bash .ci/setup-serve); skips without it.
"""

import logging
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engines.t2i import TextToImagePipeline
from tests.test_serve import InferenceServerException, grpc, http, require_serve_env, run_server

MODEL = "dd_t2i"
PROMPTS = ["a red seven", "Green  SEVEN, green!", "the digit 7 in red", "seven", "red", "a green seven"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def t2i_server(t2i_folder, tmp_path_factory):
    py = require_serve_env("tokenizers")
    with run_server(
        tmp_path_factory.mktemp("serve_t2i"), t2i_folder, MODEL, "--allow-unvalidated", py=py
    ) as s:
        yield s


def _input(mod, name, arr, dtype):
    x = mod.InferInput(name, list(arr.shape), dtype)
    x.set_data_from_numpy(arr)
    return x


def prompt_inputs(mod, prompts, seeds, steps=None, prompt_bytes=None):
    raw = prompt_bytes or [p.encode() for p in prompts]
    inputs = [
        _input(mod, "prompt", np.array([[b] for b in raw], dtype=object), "BYTES"),
        _input(mod, "seed", np.array(seeds, np.int64)[:, None], "INT64"),
    ]
    if steps is not None:
        inputs.append(_input(mod, "num_inference_steps", np.full((len(seeds), 1), steps, np.int32), "INT32"))
    return inputs


def image_inputs(mod, prompts, seeds, image, mask=None, strength=None, steps=2):
    """A prompt request with `image` [B, H, W, 3] (+ mask_image [B, H, W], strength), dtypes as given."""
    types = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}
    inputs = prompt_inputs(mod, prompts, seeds, steps)
    inputs.append(_input(mod, "image", image, types[image.dtype]))
    if mask is not None:
        inputs.append(_input(mod, "mask_image", mask, types[mask.dtype]))
    if strength is not None:
        inputs.append(_input(mod, "strength", np.full((len(seeds), 1), strength, np.float32), "FP32"))
    return inputs


def infer(mod, url, prompts, seeds, steps=None):
    return (
        mod.InferenceServerClient(url)
        .infer(MODEL, prompt_inputs(mod, prompts, seeds, steps))
        .as_numpy("image")
    )


def test_concurrent_prompts_give_the_runtimes_images(t2i_server, t2i_folder):
    # 12 requests of 1-2 prompts from 6 threads, HTTP and gRPC, two step counts: the batcher merges them
    jobs = []
    for i in range(12):
        n = 1 + i % 2
        prompts = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(n)]
        seeds = [10 * i + k for k in range(n)]
        mod = grpc if i % 3 == 0 else http
        jobs.append(
            (mod, t2i_server["grpc" if mod is grpc else "http"], prompts, seeds, 3 if i % 4 else None)
        )
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda j: infer(*j), jobs))
    worst = 0
    with TextToImagePipeline(t2i_folder, threads=1) as pipe:
        for (_, _, prompts, seeds, steps), image in zip(jobs, got, strict=True):
            want = pipe(prompts, seeds=seeds, num_inference_steps=steps)
            assert image.dtype == np.uint8 and image.shape == want.shape == (len(prompts), 16, 16, 3)
            worst = max(worst, int(np.abs(image.astype(int) - want).max()))
    logging.getLogger(__name__).info("served vs runtime: max |diff| %d uint8 levels", worst)
    assert worst <= 1, f"served images differ from the runtime's by {worst} uint8 levels"


def bad_requests(mod):
    from tests.test_img2img import test_images

    one = np.array([[1]], np.int64)
    img = test_images(1, 16, 16, seed=0)
    return {
        "float image": (
            image_inputs(mod, ["a"], [1], img.astype(np.float32)),
            "data-type is 'FP32', but model 'dd_t2i' expects 'UINT8'",
        ),
        "2-channel image": (
            image_inputs(mod, ["a"], [1], img[..., :2]),
            "unexpected shape for input 'image'",
        ),
        "17x16 image": (
            image_inputs(mod, ["a"], [1], test_images(1, 17, 16, seed=0)),
            r"^image 17x16: height=17: must be a multiple of 2 in \[16, 32\]",
        ),
        "mask of another size": (
            image_inputs(mod, ["a"], [1], img, mask=np.zeros((1, 16, 24), np.uint8)),
            r"^mask_image: 16x24, the image is 16x16",
        ),
        "strength 1.5": (
            image_inputs(mod, ["a"], [1], img, strength=1.5),
            r"^strength=1.5: must be in \(0, 1\]$",
        ),
        "prompt over the token limit": (
            prompt_inputs(mod, ["seven " * 80], [1]),
            r"^prompt 0: 82 tokens \(with BOS and EOS\), over the limit of 77",
        ),
        "non-UTF-8 bytes": (
            prompt_inputs(mod, None, [1], prompt_bytes=[b"a \xff red seven"]),
            r"^prompt 0: not valid UTF-8 \(invalid start byte at byte 2\)$",
        ),
        "wrong dtype": (
            [
                _input(mod, "prompt", np.array([[b"a"]], object), "BYTES"),
                _input(mod, "seed", one.astype(np.float32), "FP32"),
            ],
            "data-type is 'FP32', but model 'dd_t2i' expects 'INT64'",
        ),
        "prompt as INT64": (
            [_input(mod, "prompt", one, "INT64"), _input(mod, "seed", one, "INT64")],
            "data-type is 'INT64', but model 'dd_t2i' expects 'BYTES'",
        ),
        "batch over max": (prompt_inputs(mod, ["a"] * 5, list(range(5))), "batch-size must be <= 4"),
        "negative seed": (
            prompt_inputs(mod, ["a"], [-1]),
            r"^seeds: -1 is not an integer in \[0, 2\^63 - 1\]$",
        ),
        "missing seed": (
            [_input(mod, "prompt", np.array([[b"a"]], object), "BYTES")],
            "missing required input",
        ),
        "zero steps": (
            prompt_inputs(mod, ["a"], [1], steps=0),
            r"^num_inference_steps=0: must be in \[1, 1000\]$",
        ),
    }


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_bad_requests_fail_alone_and_the_server_stays_up(t2i_server, t2i_folder, proto):
    mod = grpc if proto == "grpc" else http
    client = mod.InferenceServerClient(t2i_server[proto])
    cases = bad_requests(mod)
    good_prompt = ["a red seven"]

    def send(case):  # each bad request goes beside a good one, so the batcher may merge them
        inputs, _ = cases[case]
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(infer, mod, t2i_server[proto], good_prompt, [5], 2)
            try:
                client.infer(MODEL, inputs)
                bad = None
            except InferenceServerException as e:
                bad = e
            return bad, good.result()

    with TextToImagePipeline(t2i_folder, threads=1) as pipe:
        want_good = pipe(good_prompt, seeds=[5], num_inference_steps=2)
    status = "StatusCode.INVALID_ARGUMENT" if proto == "grpc" else "400"

    for case, (_, pattern) in cases.items():
        bad, good = send(case)
        assert bad is not None, f"{case}: answered with an image"
        msg = bad.message().strip()
        assert str(bad.status()) == status, (case, bad.status(), msg)
        assert "\n" not in msg and "Traceback" not in msg, (case, msg)
        assert re.search(pattern, msg), (case, msg)
        assert np.abs(good.astype(int) - want_good).max() <= 1, case
    assert t2i_server["proc"].poll() is None
    c = http.InferenceServerClient(t2i_server["http"])
    assert c.is_server_live() and c.is_model_ready(MODEL)


def test_empty_prompt_is_the_unconditional_image(t2i_server, t2i_folder):
    got = infer(http, t2i_server["http"], ["", "a red seven"], [7, 7], 2)
    with TextToImagePipeline(t2i_folder, threads=1) as pipe:
        want = pipe(["", "a red seven"], seeds=[7, 7], num_inference_steps=2)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert np.abs(got[0].astype(int) - got[1]).max() > 0  # the prompt matters: not one image for both


def test_image_requests_give_the_runtimes_images(t2i_server, t2i_folder):
    """Image-to-image over HTTP at another size than the default (its output takes the image's),
    inpainting over gRPC: the runtime's images for the same prompt, image, mask, strength and seed."""
    from tests.test_img2img import test_images
    from tests.test_inpaint import test_masks

    img, mask = test_images(1, 24, 32, seed=7), test_masks(1, 16, 16)
    small = test_images(1, 16, 16, seed=8)
    i2i = http.InferenceServerClient(t2i_server["http"]).infer(
        MODEL, image_inputs(http, ["a red seven"], [3], img, strength=0.7, steps=4)
    )
    inpaint = grpc.InferenceServerClient(t2i_server["grpc"]).infer(
        MODEL, image_inputs(grpc, ["green"], [4], small, mask=mask, steps=4)
    )
    with TextToImagePipeline(t2i_folder, threads=1) as pipe:
        want_i2i = pipe(["a red seven"], image=img, strength=0.7, seeds=[3], num_inference_steps=4)
        want_inpaint = pipe(["green"], image=small, mask_image=mask, seeds=[4], num_inference_steps=4)
    got_i2i, got_inpaint = i2i.as_numpy("image"), inpaint.as_numpy("image")
    assert got_i2i.dtype == np.uint8 and got_i2i.shape == want_i2i.shape == (1, 24, 32, 3)
    diffs = [
        int(np.abs(g.astype(int) - w).max()) for g, w in ((got_i2i, want_i2i), (got_inpaint, want_inpaint))
    ]
    logging.getLogger(__name__).info("served vs runtime (img2img, inpainting): max |diff| %s", diffs)
    assert max(diffs) <= 1, diffs


def test_unvalidated_folder_and_wrong_backend_are_one_line_exit_2(t2i_folder):
    import os
    import subprocess

    from tests.test_serve import ROOT

    py = require_serve_env("tokenizers")
    for args, msg in (
        ([], "no dd-compile run validated; compile it with dd-compile, or pass --allow-unvalidated"),
        (["--backend", "tensorrt", "--allow-unvalidated"], "serves on onnxruntime or openvino"),
    ):
        r = subprocess.run(
            [str(py), "-m", "engines.serve", str(t2i_folder), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and msg in err[0], (r.returncode, r.stderr[-500:])
