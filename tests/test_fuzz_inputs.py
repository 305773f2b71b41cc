"""Seeded fuzz of our own formats: every mutated student.ckpt (delete, retype, add keys, truncate,
flip header and body bytes) ends in exit 0/1 with a report or exit 2 with one line naming the file;
never a traceback, never exit 4 (an unhandled case). The same for manifest.json under engines.load,
and for the runtime's arguments."""

import copy
import json
import random
import struct
import traceback
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.cli_errors import EXIT_INTERNAL, describe
from engines.errors import InputError, IntegrityError
from optimizer.checkpoint import StudentCheckpoint, TeacherRef, load_checkpoint, save_checkpoint
from optimizer.cli import main as compile_main
from optimizer.models import load_teacher

FAST = ["--batch-sizes", "1,2", "--samples", "4", "--fid-samples", "8", "--bench-seconds", "0"]
FAST += ["--threads", "1", "--precision", "fp32", "--bar", "paired_psnr=-100", "--bar", "fid_margin=1e9"]
ODD_VALUES = [None, 0, -1, 1.5, float("nan"), True, "x", "", [], [1, "a"], {}, {"a": 1}, 10**30]


@pytest.fixture(scope="module")
def student(tiny_teacher_dir, tmp_path_factory):
    t = load_teacher(tiny_teacher_dir)
    ck = StudentCheckpoint(
        "UNet2DModel",
        dict(t.model.config),
        "DDPMScheduler",
        dict(t.scheduler.config),
        t.schedule(2),
        TeacherRef(str(tiny_teacher_dir), t.weights_sha256),
        {"method": "none"},
    )
    return save_checkpoint(ck, t.model, tmp_path_factory.mktemp("fuzz") / "student.ckpt")


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _paths(obj, prefix=()):
    """Every (container path, key) in a JSON tree."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _mutate_tree(tree, rng: random.Random, op: str):
    tree = copy.deepcopy(tree)
    paths = list(_paths(tree))
    path = rng.choice(paths)
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "retype":
        parent[key] = rng.choice([v for v in ODD_VALUES if type(v) is not type(parent[key])])
    else:  # add an unknown key to the nearest object
        target = (
            parent[key] if isinstance(parent[key], dict) else parent if isinstance(parent, dict) else tree
        )
        target[f"unknown_{rng.randrange(100)}"] = rng.choice(ODD_VALUES)
    return tree


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded mutation of a student.ckpt: (what was done, the new bytes)."""
    header, body = _split(raw)
    meta = json.loads(header["__metadata__"]["dd_compile"])
    op = rng.choice(["meta", "meta", "meta", "header", "truncate", "flip_header", "flip_body", "whole"])
    if op == "meta":
        kind = rng.choice(["delete", "retype", "add"])
        header["__metadata__"]["dd_compile"] = json.dumps(_mutate_tree(meta, rng, kind))
        return f"meta {kind}", _join(header, body)
    if op == "header":
        kind = rng.choice(["delete", "retype", "add"])
        return f"header {kind}", _join(_mutate_tree(header, rng, kind), body)
    if op == "truncate":
        return "truncate", raw[: rng.randrange(len(raw))]
    if op == "whole":
        other = rng.choice([[], [header], "x", 1, None, {"__metadata__": []}])
        return "whole header", _join(other, body)
    b = bytearray(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    lo, hi = (0, 8 + n) if op == "flip_header" else (8 + n, len(raw))
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return op, bytes(b)


def load_stage(path: Path) -> tuple[int, str]:
    """What dd-compile does before any work (read, check, build and probe the model), through the
    CLI's own error mapping: (exit code, message line)."""
    try:
        load_checkpoint(path).build_model()
    except Exception as e:
        code, line = describe("dd-compile", e)
        return code, line + ("\n" + traceback.format_exc() if code == EXIT_INTERNAL else "")
    return 0, ""


def _check_case(i: int, raw: bytes, tmp: Path) -> tuple[int, str, Path]:
    rng = random.Random(i)
    what, data = mutate(raw, rng)
    path = tmp / f"case{i}.ckpt"
    path.write_bytes(data)
    code, line = load_stage(path)
    assert code != EXIT_INTERNAL, f"case {i} ({what}): unhandled: {line}"
    assert code in (0, 2), f"case {i} ({what}): exit {code}: {line}"
    if code == 2:
        assert "\n" not in line and str(path) in line, f"case {i} ({what}): {line!r}"
    return code, what, path


def _fuzz(student, tmp_path, cases):
    raw = student.read_bytes()
    results = [_check_case(i, raw, tmp_path) for i in cases]
    refused = [r for r in results if r[0] == 2]
    # the fuzz must reach both outcomes, or it tests nothing
    assert refused and len(refused) < len(results), [r[:2] for r in results]
    return results


def test_fuzz_checkpoint_fast(student, tmp_path):
    results = _fuzz(student, tmp_path, range(50))
    # the refusals through the real CLI: exit 2, one line naming the file, no traceback
    for _, what, path in [r for r in results if r[0] == 2][:10]:
        res = CliRunner().invoke(compile_main, [str(path), "-o", str(tmp_path / "out"), *FAST])
        assert res.exit_code == 2, (what, res.output)
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in res.output, (what, lines)


@pytest.mark.slow
def test_fuzz_checkpoint_many(student, tmp_path):
    _fuzz(student, tmp_path, range(50, 450))


@pytest.mark.slow
def test_fuzz_full_compile(student, tmp_path):
    """One mutated checkpoint of each kind the loader accepts, compiled end to end: exit 0 or 1 with
    a report (flipped weight bytes may give NaN samples: a failed, named check), never 2 or 4 late."""
    raw = student.read_bytes()
    accepted: dict[str, Path] = {}
    for i in range(1000, 2000):
        rng = random.Random(i)
        what, data = mutate(raw, rng)
        if what not in ("flip_body", "meta add", "meta retype") or what in accepted:
            continue
        p = tmp_path / f"c{i}.ckpt"
        p.write_bytes(data)
        if load_stage(p)[0] == 0:
            accepted[what] = p
        if len(accepted) == 3:
            break
    assert len(accepted) == 3, accepted
    for what, p in accepted.items():
        out = tmp_path / f"out_{p.stem}"
        res = CliRunner().invoke(compile_main, [str(p), "-o", str(out), *FAST])
        assert res.exit_code in (0, 1), (what, res.output)
        assert (out / "report.json").exists()


def _nan_student(student, dst: Path) -> Path:
    header, body = _split(student.read_bytes())
    name = next(k for k, v in header.items() if k.endswith("conv_out.bias"))
    b = bytearray(body)
    lo, hi = header[name]["data_offsets"]
    b[lo:hi] = np.full((hi - lo) // 4, np.nan, np.float32).tobytes()
    dst.write_bytes(_join(header, bytes(b)))
    return dst


@pytest.mark.slow
def test_nan_weights_fail_the_report(student, tmp_path):
    """NaN weights: exit 1 and a report naming the non-finite outputs (was: a traceback in FID)."""
    p = _nan_student(student, tmp_path / "nan.ckpt")
    res = CliRunner().invoke(compile_main, [str(p), "-o", str(tmp_path / "out"), *FAST])
    assert res.exit_code == 1, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    text = " ".join(report["failures"])
    assert "non-finite" in text and "NaN/Inf" in text, report["failures"]


# -- manifest.json under engines.load ------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz_out") / "out"
    res = CliRunner().invoke(compile_main, [str(student), "-o", str(out), *FAST])
    assert res.exit_code in (0, 1), res.output
    return out


@pytest.mark.slow
def test_fuzz_manifest(compiled, tmp_path):
    import shutil

    import engines

    manifest = json.loads((compiled / "manifest.json").read_text())
    unexpected = []
    for i in range(150):
        rng = random.Random(i)
        out = tmp_path / f"m{i}"
        shutil.copytree(compiled, out)
        kind = rng.choice(["delete", "retype", "add"])
        (out / "manifest.json").write_text(json.dumps(_mutate_tree(manifest, rng, kind)))
        try:
            engines.load(out, precision="fp32").close()
        except (InputError, IntegrityError):
            pass
        except Exception as e:
            unexpected.append(f"case {i} ({kind}): {type(e).__name__}: {e}")
        shutil.rmtree(out)
    assert not unexpected, "\n".join(unexpected[:10])


# -- runtime arguments ---------------------------------------------------------------------------


@pytest.mark.slow
def test_runtime_arguments_named(compiled):
    import engines

    with engines.load(compiled, precision="fp32") as pipe:
        c, h, w = pipe.sample_shape
        bad = {
            "seeds": dict(seeds=[]),
            "seeds:": dict(seeds=[-1]),
            "seeds: ": dict(seeds=["a"]),
            "noise: empty": dict(noise=np.zeros((0, c, h, w), np.float32)),
            "noise: contains": dict(noise=np.full((1, c, h, w), np.nan, np.float32)),
            "noise: shape": dict(noise=np.zeros((1, c, h + 1, w), np.float32)),
        }
        for want, kw in bad.items():
            with pytest.raises(InputError, match=want.split(":")[0]):
                pipe(**kw)
        assert np.isfinite(pipe(seeds=[0, 1])).all()


def test_sampler_inputs_checked():
    from engines.schedule import SamplingSchedule, check_sampler_inputs

    sch = SamplingSchedule("ddim", (999, 499), (0.01, 0.5), "epsilon")
    shape = (1, 4, 4)
    ok = np.zeros((2, *shape), np.float32)
    check_sampler_inputs([0, 1], None, None, None, shape, sch)
    check_sampler_inputs(None, ok, np.zeros((1, 2, *shape), np.float32), None, shape, sch)
    cases = [
        ("seeds: empty", ([], None, None, None)),
        ("seeds: -1", ([-1], None, None, None)),
        ("seeds: True", ([True], None, None, None)),
        ("noise: empty batch", (None, np.zeros((0, *shape), np.float32), None, None)),
        ("noise: contains NaN", (None, np.full((2, *shape), np.nan, np.float32), None, None)),
        ("noise: shape", (None, np.zeros((2, 1, 4, 5), np.float32), None, None)),
        ("noise: expected floating", (None, ok.astype(np.int64), None, None)),
        ("step_noise: shape", (None, ok, np.zeros((1, 3, *shape), np.float32), None)),
        ("cond['class_labels']", (None, ok, None, {"class_labels": np.zeros(3, np.int64)})),
    ]
    for want, args in cases:
        with pytest.raises(InputError, match=want.replace("[", r"\[").replace("]", r"\]")):
            check_sampler_inputs(*args, shape, sch)
