"""A bad request fails alone: concurrent mixed traffic against the real dd-serve on 127.0.0.1.

Several hundred bounded requests from 8 client threads, about 20% bad (negative seed, wrong dtype,
wrong shape, batch over the maximum, NaN noise, seed and noise together). The dynamic batcher
merges them with good ones; every good request must get the runtime's images for its seeds,
every bad one a 400 with its one-line reason, and the server must still answer at the end.
Needs the serve venv (bash .ci/setup-serve); skips without it.
"""

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import engines
from engines.schedule import draw_noise
from tests.test_serve import (  # noqa: F401  (server: the fixture; skips without tritonclient)
    MODEL,
    InferenceServerException,
    grpc,
    http,
    infer,
    server,
)

N_REQUESTS, THREADS, BAD_FRACTION, MAX_SEED_USED = 300, 8, 0.2, 200


def _input(mod, name, arr, dtype):
    x = mod.InferInput(name, list(arr.shape), dtype)
    x.set_data_from_numpy(arr)
    return x


def bad_request(kind: str, mod, rng: random.Random) -> tuple[list, str]:
    """(inputs, a regex the server's reason must match) for one bad request of this kind."""
    b = rng.randint(1, 3)
    if kind == "negative seed":
        seeds = np.array([[rng.randint(0, 50)] for _ in range(b)], np.int64)
        seeds[rng.randrange(b), 0] = -rng.randint(1, 2**40)
        return [_input(mod, "seed", seeds, "INT64")], r"seeds: -\d+ is not an integer in \[0, 2\^63 - 1\]"
    if kind == "wrong dtype":
        return [_input(mod, "seed", np.zeros((b, 1), np.float32), "FP32")], "data-type"
    if kind == "wrong shape":
        return [_input(mod, "seed", np.zeros((b, 2), np.int64), "INT64")], "shape"
    if kind == "batch over max":
        return [_input(mod, "seed", np.zeros((9, 1), np.int64), "INT64")], "batch-size"
    if kind == "nan noise":
        noise = np.zeros((b, 1, 8, 8), np.float32)
        noise[0, 0, rng.randrange(8), rng.randrange(8)] = np.nan
        return [_input(mod, "noise", noise, "FP32")], r"noise: contains NaN or Inf"
    if kind == "seed and noise":
        return [
            _input(mod, "seed", np.zeros((1, 1), np.int64), "INT64"),
            _input(mod, "noise", np.zeros((1, 1, 8, 8), np.float32), "FP32"),
        ], "send exactly one of 'seed'"
    raise AssertionError(kind)


BAD_KINDS = ["negative seed", "wrong dtype", "wrong shape", "batch over max", "nan noise", "seed and noise"]


def plan(seed: int = 0) -> list[dict]:
    """The traffic: a fixed, seeded mix; a bad request of each kind at least once."""
    rng = random.Random(seed)
    jobs = []
    for i in range(N_REQUESTS):
        proto = "grpc" if i % 3 == 0 else "http"
        if i < len(BAD_KINDS) * 2 or rng.random() < BAD_FRACTION - len(BAD_KINDS) * 2 / N_REQUESTS:
            jobs.append({"proto": proto, "bad": BAD_KINDS[i % len(BAD_KINDS)], "rng": rng.random()})
        else:
            seeds = [rng.randrange(MAX_SEED_USED) for _ in range(rng.randint(1, 3))]
            jobs.append({"proto": proto, "seeds": seeds, "noise": rng.random() < 0.2})
    rng.shuffle(jobs)
    return jobs


@pytest.mark.slow
def test_bad_requests_fail_alone_under_concurrent_mixed_traffic(server):  # noqa: F811
    with engines.load(server["out"], precision="fp32") as pipe:
        want = pipe(seeds=list(range(MAX_SEED_USED)))  # images per seed do not depend on the batch
        steps = pipe.schedule.steps
    clients = threading.local()

    def client(proto: str):
        if not hasattr(clients, proto):
            mod = grpc if proto == "grpc" else http
            setattr(clients, proto, mod.InferenceServerClient(server[proto]))
        return getattr(clients, proto)

    def run(job: dict) -> tuple[dict, object]:
        mod = grpc if job["proto"] == "grpc" else http
        if "bad" in job:
            inputs, _ = bad_request(job["bad"], mod, random.Random(job["rng"]))
        elif job["noise"]:
            noise, _ = draw_noise(job["seeds"], (1, 8, 8), steps)
            inputs = [_input(mod, "noise", noise, "FP32")]
        else:
            inputs = [_input(mod, "seed", np.array(job["seeds"], np.int64)[:, None], "INT64")]
        try:
            return job, client(job["proto"]).infer(MODEL, inputs).as_numpy("images")
        except InferenceServerException as e:
            return job, e

    jobs = plan()
    n_bad = sum("bad" in j for j in jobs)
    assert 0.15 * N_REQUESTS <= n_bad <= 0.3 * N_REQUESTS
    t0 = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.monotonic() - t0
    assert elapsed < 240, f"{N_REQUESTS} requests took {elapsed:.0f} s"

    good_failed, bad_passed, wrong = [], [], []
    for job, got in results:
        if "bad" not in job:
            if isinstance(got, Exception):
                good_failed.append((job["seeds"], str(got)[:200]))
            elif got.shape != (len(job["seeds"]), 1, 8, 8) or np.abs(got - want[job["seeds"]]).max() > 1e-4:
                wrong.append(job["seeds"])
            continue
        if not isinstance(got, Exception):
            bad_passed.append(job["bad"])
            continue
        _, pattern = bad_request(job["bad"], http, random.Random(job["rng"]))
        status = str(got.status())
        reason = got.message()
        one_line = "\n" not in reason.strip() and "Traceback" not in reason
        if status not in ("400", "StatusCode.INVALID_ARGUMENT") or not one_line:
            wrong.append((job["bad"], status, reason[:300]))
        elif not re.search(pattern, reason):
            wrong.append((job["bad"], status, reason[:300]))
    assert not good_failed, f"{len(good_failed)} good requests failed, e.g. {good_failed[:3]}"
    assert not bad_passed, f"bad requests answered with images: {bad_passed[:5]}"
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"
    assert server["proc"].poll() is None
    c = http.InferenceServerClient(server["http"])
    assert c.is_server_live() and c.is_model_ready(MODEL)
    assert np.abs(infer(grpc, server["grpc"], [7, 8]) - want[[7, 8]]).max() <= 1e-4
