"""dd-serve --backend openvino, for real (PyTriton on 127.0.0.1): the served pixel student and the
served text-to-image pipeline give the images the runtime gives on OpenVINO (engines.load(...,
backend="openvino") and TextToImagePipeline(..., backend="openvino")) for the same seeds.

Skips with the reason when openvino is missing here or in the serve venv (pip install openvino
into $DD_SERVE_VENV after bash .ci/setup-serve).
"""

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import engines
from engines.t2i import TextToImagePipeline
from tests.test_serve import FIXTURE, MODEL, grpc, http, require_serve_env, run_server
from tests.test_serve import infer as infer_seeds
from tests.test_serve_t2i import MODEL as T2I_MODEL
from tests.test_serve_t2i import infer as infer_prompts

pytest.importorskip("openvino", reason="openvino not installed here: pip install 'dd-compile[openvino]'")
pytestmark = pytest.mark.slow


def test_served_pixel_student_on_openvino_gives_the_runtimes_images(tmp_path):
    py = require_serve_env("openvino")
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    with run_server(tmp_path, out, MODEL, "--backend", "openvino", py=py) as s:
        urls = {grpc: s["grpc"], http: s["http"]}
        jobs = [(m, urls[m], [2 * i, 2 * i + 1]) for i, m in enumerate([http, grpc, http, grpc])]
        with ThreadPoolExecutor(4) as pool:
            got = np.concatenate(list(pool.map(lambda j: infer_seeds(*j), jobs)))
        assert "(openvino/fp32" in s["log"].read_text()
    with engines.load(out, backend="openvino", threads=1) as pipe:
        assert pipe.runner.backend == "openvino"
        want = pipe(seeds=list(range(8)))
    assert got.shape == want.shape == (8, 1, 8, 8)
    logging.getLogger(__name__).info("pixel, openvino: max |diff| %.2e", np.abs(got - want).max())
    assert np.abs(got - want).max() <= 1e-4


def test_served_text_to_image_on_openvino_gives_the_runtimes_images(t2i_folder, tmp_path):
    py = require_serve_env("openvino", "tokenizers")
    args = ("--backend", "openvino", "--allow-unvalidated")
    prompts = [["a red seven"], ["", "green seven"], ["the digit 7 in red"]]
    with run_server(tmp_path, t2i_folder, T2I_MODEL, *args, py=py) as s:
        urls = {grpc: s["grpc"], http: s["http"]}
        jobs = []
        for i, p in enumerate(prompts):
            mod = http if i % 2 else grpc
            jobs.append((mod, urls[mod], p, [3 * i + k for k in range(len(p))], 3))
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda j: infer_prompts(*j), jobs))
        assert "(openvino, max batch 4)" in s["log"].read_text()
    with TextToImagePipeline(t2i_folder, backend="openvino", threads=1) as pipe:
        assert {r.backend for r in pipe.runners.values()} == {"openvino"}
        worst = 0
        for (_, _, p, seeds, steps), image in zip(jobs, got, strict=True):
            want = pipe(p, seeds=seeds, num_inference_steps=steps)
            assert image.dtype == np.uint8 and image.shape == want.shape == (len(p), 16, 16, 3)
            worst = max(worst, int(np.abs(image.astype(int) - want).max()))
    logging.getLogger(__name__).info("served vs runtime on openvino: max |diff| %d uint8 levels", worst)
    assert worst <= 1, f"served images differ from the runtime's by {worst} uint8 levels"
