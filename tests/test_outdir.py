"""Nothing deleted that dd-compile did not create (issue 11 §1): dd-triton --repo and the
folder-ownership rule of engines/outdir.py, case by case and over seeded random folder layouts."""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from engines.errors import InputError
from engines.outdir import KINDS, MARKER, check_target, read_marker
from engines.triton import main as triton_main
from engines.triton import write_triton_repo

FIXTURE = Path(__file__).parent / "data" / "runtime_fixture"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: its type and content (files: sha256 and mode; links: their target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(Path(p).read_bytes()).hexdigest(), os.stat(p).st_mode)
    return out


@pytest.fixture
def out(tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(FIXTURE, dest)
    return dest


def run_triton(out: Path, repo: Path, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        triton_main([str(out), "--repo", str(repo), "--precision", "fp32"])
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "where, words",
    [
        ("out", "is"),  # dd-triton OUT --repo OUT
        ("inside", "lies inside"),  # --repo OUT/triton
        ("inside_new", "lies inside"),  # --repo OUT/new/deeper
        ("parent", "contains"),  # --repo DIR that holds OUT
        ("user_dir", "not written by dd-compile"),  # a folder of unrelated files
        ("file", "existing file"),  # --repo FILE
        ("under_file", "existing file"),  # --repo FILE/sub
        ("other_kind", "as a bench folder"),  # a folder dd-bench wrote
    ],
)
def test_triton_repo_refused_before_any_work(tmp_path, out, capsys, where, words):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    (tmp_path / "f.txt").write_text("the user's")
    (tmp_path / "benchdir").mkdir()
    (tmp_path / "benchdir" / MARKER).write_text(json.dumps({"kind": "bench", "id": "x"}))
    (tmp_path / "benchdir" / "bench.json").write_text("{}")
    repo = {
        "out": out,
        "inside": out / "onnx",
        "inside_new": out / "new" / "deeper",
        "parent": tmp_path,
        "user_dir": tmp_path / "mine",
        "file": tmp_path / "f.txt",
        "under_file": tmp_path / "f.txt" / "sub",
        "other_kind": tmp_path / "benchdir",
    }[where]
    before = snapshot(tmp_path)
    code, err = run_triton(out, repo, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--repo" in err and words in err, err
    assert snapshot(tmp_path) == before  # nothing created, moved or deleted


def test_rerun_into_its_own_repo_replaces_it(tmp_path, out, capsys):
    repo = tmp_path / "repo"
    (tmp_path / ".repo.old").write_text("a user's file with the old scheme's temp name")
    assert run_triton(out, repo, capsys)[0] == 0
    assert read_marker(repo)["kind"] == "triton-repo"
    (repo / "stale.txt").write_text("left by hand in the tool's folder")
    others = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("repo")}
    assert run_triton(out, repo, capsys)[0] == 0
    assert not (repo / "stale.txt").exists() and (repo / "dd_unet" / "1" / "model.onnx").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("repo")} == others
    # an empty folder is fine too
    (tmp_path / "empty").mkdir()
    assert run_triton(out, tmp_path / "empty", capsys)[0] == 0


def test_pipeline_option_name_is_used(tmp_path, out):
    with pytest.raises(InputError, match="^--triton-repo .*: is "):
        write_triton_repo(out, out, precision="fp32", option="--triton-repo")


# -- property test: random layouts ---------------------------------------------------------------
def expected_refusal(target: Path, kind: str, protect: list[Path]) -> bool:
    """The rules, written independently of engines/outdir.py (os.path, not pathlib)."""
    t = os.path.realpath(target)
    for p in protect:
        r = os.path.realpath(p)
        if os.path.commonpath([t, r]) in (t, r):  # is, contains or lies inside
            return True
    q = t
    while True:
        if os.path.exists(q) and not os.path.isdir(q):
            return True
        if os.path.dirname(q) == q:
            break
        q = os.path.dirname(q)
    if os.path.isdir(t) and os.listdir(t):
        try:
            with open(os.path.join(t, MARKER)) as f:
                marker = json.load(f)
        except (OSError, ValueError):
            return True
        return not (isinstance(marker, dict) and marker.get("kind") == kind)
    return False


def random_world(rng: random.Random, root: Path) -> list[Path]:
    """A random tree of folders, files, markers (valid, of other kinds, broken) and symlinks."""
    dirs, paths = [root], []
    for i in range(rng.randint(3, 14)):
        parent = rng.choice(dirs)
        r = rng.random()
        p = parent / f"n{i}"
        if r < 0.4:
            p.mkdir()
            dirs.append(p)
        elif r < 0.65:
            p.write_text(f"user data {i}")
        elif r < 0.85:
            m = rng.choice(
                [
                    {"kind": rng.choice(KINDS), "id": "x"},
                    {"kind": "nonsense"},
                    ["triton-repo"],
                    None,
                ]
            )
            p.mkdir()
            (p / MARKER).write_text("{broken" if m is None else json.dumps(m))
            if rng.random() < 0.5:
                (p / "content.bin").write_bytes(bytes(rng.randrange(256) for _ in range(8)))
            dirs.append(p)
        else:
            dest = rng.choice([*dirs, *paths, root / "dangling"])
            p.symlink_to(dest, target_is_directory=dest.is_dir())
        paths.append(p)
    return [*dirs, *paths]


def _marker_kind(folder: Path) -> str | None:
    try:
        m = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m.get("kind") if isinstance(m, dict) and m.get("kind") in KINDS else None


def candidates(rng: random.Random, existing: list[Path]) -> Path:
    marked = [p for p in existing if (p / MARKER).is_file()]
    base = rng.choice(marked if marked and rng.random() < 0.4 else existing)
    r = rng.random()
    if r < 0.5:
        return base
    if r < 0.8:
        return base / f"new{rng.randint(0, 9)}"
    return base / "new" / "deeper"


@pytest.mark.parametrize("seed", range(6))
def test_check_target_refuses_exactly_when_the_rules_say(tmp_path, seed):
    rng = random.Random(seed)
    for case in range(50):
        root = tmp_path / f"w{case}"
        root.mkdir()
        existing = random_world(rng, root)
        target = candidates(rng, existing)
        kind = rng.choice(KINDS)
        if rng.random() < 0.5:  # often the kind a marker there names
            kind = _marker_kind(target) or kind
        protect = rng.sample(existing[1:], k=rng.choice([0, 0, 1, 2]))  # [0] is the root
        before = snapshot(root)
        want = expected_refusal(target, kind, protect)
        try:
            got = check_target(target, kind, "-o", protect=protect)
            refused = False
            assert got == target.resolve()
        except InputError as e:
            refused = True
            assert "\n" not in str(e) and str(e).startswith(f"-o {target}")
        assert refused == want, (seed, case, target, kind, protect, sorted(before))
        assert snapshot(root) == before


@pytest.mark.parametrize("seed", range(3))
def test_triton_never_modifies_anything_but_its_own_repo(tmp_path, seed, capsys):
    """dd-triton into random targets of random layouts that hold a compiled output: refused
    exactly when the rules say; otherwise only the repo (and new parent folders) change."""
    rng = random.Random(1000 + seed)
    outcomes = {"refused": 0, "written": 0}
    for case in range(25):
        root = tmp_path / f"w{case}"
        root.mkdir()
        existing = random_world(rng, root)
        out = rng.choice([p for p in existing if p.is_dir() and not p.is_symlink()]) / "out"
        shutil.copytree(FIXTURE, out)
        existing += [out, out / "onnx"]
        target = candidates(rng, existing)
        want = expected_refusal(target, "triton-repo", [out])
        before = snapshot(root)
        real = Path(os.path.realpath(target))
        code, err = run_triton(out, target, capsys)
        after = snapshot(root)
        if want:
            assert code == 2 and len(err.splitlines()) == 1, err
            assert after == before
            outcomes["refused"] += 1
            continue
        assert code == 0, err
        assert read_marker(real)["kind"] == "triton-repo"
        rel = os.path.relpath(real, root)

        def mine(k: str, rel: str = rel) -> bool:
            return k == rel or k.startswith(rel + os.sep)

        new_parents = {
            k for k in after if k not in before and after[k] == ("dir",) and rel.startswith(k + os.sep)
        }
        assert {k: v for k, v in before.items() if not mine(k)} == {
            k: v for k, v in after.items() if not mine(k) and k not in new_parents
        }
        outcomes["written"] += 1
    assert outcomes["refused"] and outcomes["written"], outcomes  # both branches exercised


@pytest.mark.slow
def test_distill_refuses_a_users_stem_distill_folder(tmp_path):
    """dd-distill's <stem>.distill/ follows the same rule: a user's folder there is never written."""
    from optimizer.distill import DistillConfig, run_distillation
    from tests.test_distill import make_teacher

    teacher = make_teacher(tmp_path / "teacher")
    work = tmp_path / "student.distill"
    work.mkdir()
    (work / "notes.txt").write_text("the user's")
    before = snapshot(tmp_path)
    cfg = DistillConfig(
        teacher=str(teacher), out=str(tmp_path / "student.ckpt"), steps=2, teacher_steps=8, iters=2, threads=1
    )
    with pytest.raises(InputError, match=r"^-o \(its <stem>\.distill/ folder\) .*not written by dd-compile"):
        run_distillation(cfg)
    assert snapshot(tmp_path) == before
