"""The training loop shared by every method: batches, annealed Adam, NaN guard, DDP, progress,
and atomic training-state checkpoints that --resume continues from bit for bit.

Randomness is a pure function of (seed, phase, iteration, rank): each iteration reseeds its own
generator, so a resumed run draws exactly the batches and noise an uninterrupted run would.
The state file is safetensors (tensors) + JSON metadata (position, losses, records): nothing is
pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.errors import DDCompileError, InputError
from engines.fileio import atomic_path
from optimizer.distill.conditioning import take

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
STATE_VERSION = 1


class TrainingDiverged(DDCompileError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""

    exit_code = 1  # a failed run, like a failed quality check


class StopRequested(DDCompileError):
    """`stop_after` iterations reached (tests and time-boxed runs); resume with --resume."""

    exit_code = 3


@dataclass
class Dist:
    """torch.distributed context: world of 1 without torchrun."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """Join the process group torchrun (or mp.spawn) set up: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return Dist(rank=rank, world=world, device=device)


def iteration_generator(seed: int, phase: int, it: int, rank: int, device: torch.device) -> torch.Generator:
    # distinct, reproducible streams per (seed, phase, iteration, rank)
    g = torch.Generator(device=device)
    # masked to 63 bits: torch takes a signed 64-bit seed (unmasked, --seed >= 3589 overflowed);
    # smaller values are unchanged, so existing runs resume bit for bit
    g.manual_seed((((seed * 1_000_003 + phase) * 10_000_019 + it) * 257 + rank) & ((1 << 63) - 1))
    return g


# -- training state (atomic, safetensors) -------------------------------------------------------


# Test hook: SIGKILL this process right after the checkpoint at that global iteration is written,
# so kill -9 + --resume is tested at a known point instead of racing the run.
FAULT_ENV = "DD_DISTILL_KILL_AFTER_CHECKPOINT"


def _fault_after_checkpoint(iteration: int) -> None:
    if os.environ.get(FAULT_ENV) == str(iteration):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    # clone: the same module may be saved under two prefixes (safetensors refuses shared storage)
    flat = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"dd_distill": json.dumps({"version": STATE_VERSION, **meta})})


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("dd_distill")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: cannot read the training state ({e})") from None
    if raw is None:
        raise InputError(f"{path}: not a dd-distill training state")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"{path}: training state metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: training state metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("version") != STATE_VERSION or isinstance(meta.get("version"), bool):
        raise InputError(f"{path}: training state version {meta.get('version')!r} not supported")
    _check_state_meta(path, meta)
    return tensors, meta


def _check_state_meta(path: Path, meta: dict[str, Any]) -> None:
    """Structure and types of the resume record, each problem naming its field (never trusted)."""

    def bad(field: str, what: str) -> InputError:
        return InputError(f"{path}: training state field {field!r} must be {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    known = {"version", "phase", "iteration", "key", "losses", "records", "seconds", "names"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise InputError(f"{path}: unknown training state field {unknown[0][:80]!r}")
    for k in ("phase", "iteration", "key", "losses", "records", "seconds"):
        if k not in meta:
            raise InputError(f"{path}: training state lacks {k!r}")
    for k in ("phase", "iteration"):
        if not is_int(meta[k]) or meta[k] < 0:
            raise bad(k, "a non-negative integer")
    if not isinstance(meta["key"], dict):
        raise bad("key", "an object")
    losses = meta["losses"]
    if not isinstance(losses, dict) or not all(
        isinstance(v, list) and all(is_num(x) for x in v) for v in losses.values()
    ):
        raise bad("losses", "an object of lists of numbers")
    if not isinstance(meta["records"], list) or not all(isinstance(r, dict) for r in meta["records"]):
        raise bad("records", "a list of objects")
    if not isinstance(meta["seconds"], dict) or not all(is_num(v) for v in meta["seconds"].values()):
        raise bad("seconds", "an object of numbers")
    names = meta.get("names", {})
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise bad("names", "an object of strings")


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(sd, strict=True)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


# -- the loop -------------------------------------------------------------------------------------

# (net, x0 batch, generator, conditioning rows of the batch: {} for unconditional teachers)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator, dict[str, torch.Tensor]], torch.Tensor]
# (the iteration's generator, local batch size) -> (x0 batch, conditioning): a batch made per
# iteration (text-to-image: VAE latents and text embeddings) instead of rows of a fixed tensor
DrawFn = Callable[[torch.Generator, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Phase:
    index: int  # position in the run (checkpoints and RNG streams are keyed by it)
    name: str  # shown in the progress bar, e.g. "round 2/4 (32->16 steps)"
    iters: int
    lr: float
    trainable: nn.Module  # what the optimizer updates (wrapped in DDP when distributed)
    loss_fn: LossFn  # (net, x0 batch, generator, cond) -> scalar loss
    state_modules: dict[str, nn.Module]  # everything a resume needs, by prefix
    after_step: Callable[[], None] | None = None  # e.g. the EMA update
    anneal: bool = True  # lr decays linearly to 0 over the phase; False: constant lr


class Trainer:
    def __init__(
        self,
        work_dir: Path,
        data: torch.Tensor | None,
        batch_size: int,
        seed: int,
        checkpoint_every: int,
        dist: Dist,
        stop_after: int | None = None,
        grad_clip: float = 1.0,
        cond: dict[str, torch.Tensor] | None = None,
        draw: DrawFn | None = None,
    ):
        if (data is None) == (draw is None):
            raise ValueError("Trainer needs exactly one of data and draw")
        self.work_dir, self.data, self.seed, self.draw = work_dir, data, seed, draw
        self.cond = cond  # conditioning rows aligned with `data` (conditional teachers)
        self.dist, self.checkpoint_every, self.stop_after = dist, checkpoint_every, stop_after
        self.grad_clip = grad_clip
        if batch_size % dist.world:
            raise InputError(f"--batch-size {batch_size} is not divisible by {dist.world} ranks")
        self.local_batch = batch_size // dist.world
        self.meta: dict[str, Any] = {
            "phase": 0,
            "iteration": 0,
            "losses": {},
            "records": [],
            "seconds": {},
        }
        self.resume_tensors: dict[str, torch.Tensor] | None = None
        self.iterations_run = 0
        self.checkpointed = False  # a state file of this run exists (written, or resumed from)

    @property
    def state_path(self) -> Path:
        return self.work_dir / STATE_FILE

    def try_resume(self, key: dict[str, Any]) -> bool:
        if not self.state_path.exists():
            log.warning("--resume: no training state at %s; starting from scratch", self.state_path)
            return False
        tensors, meta = load_state(self.state_path)
        if meta.get("key") != key:
            diff = sorted(k for k in key if meta.get("key", {}).get(k) != key[k])
            raise InputError(
                f"{self.state_path}: was written with different settings ({', '.join(diff)}); "
                "rerun them or drop --resume"
            )
        self.resume_tensors, self.meta = tensors, meta
        self.checkpointed = True
        log.info("resuming at phase %d iteration %d", meta["phase"], meta["iteration"])
        return True

    def checkpoint(
        self, key: dict[str, Any], phase: Phase, it: int, opt: torch.optim.Optimizer | None
    ) -> None:
        if self.dist.main:
            tensors: dict[str, torch.Tensor] = {}
            for prefix, m in phase.state_modules.items():
                tensors.update(module_tensors(prefix, m))
            if opt is not None:
                tensors.update(optimizer_tensors(opt))
            self.meta.update(phase=phase.index, iteration=it, key=key)
            save_state(self.state_path, tensors, self.meta)
        self.checkpointed = True
        self.dist.barrier()

    def done(self, phase_index: int) -> bool:
        """True when a resumed run already finished this phase."""
        return self.meta["phase"] > phase_index

    def restore_modules(self, phase: Phase) -> None:
        if self.resume_tensors is not None and self.meta["phase"] == phase.index:
            for prefix, m in phase.state_modules.items():
                load_module(prefix, m, self.resume_tensors)

    def run(self, phase: Phase, key: dict[str, Any]) -> list[float]:
        """Train one phase; return its per-iteration losses (mean over ranks)."""
        start = 0
        losses: list[float] = self.meta["losses"].setdefault(str(phase.index), [])
        if self.resume_tensors is not None and self.meta["phase"] == phase.index:
            start = self.meta["iteration"]
            self.restore_modules(phase)
        net: nn.Module = phase.trainable
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # rank 0's weights are broadcast here; averaged gradients keep every rank identical
            net = DDP(
                phase.trainable,
                device_ids=None if self.dist.device.type == "cpu" else [self.dist.device.index],
            )
        params = [p for p in phase.trainable.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=phase.lr)
        if start > 0:
            load_optimizer(opt, self.resume_tensors)
        del losses[start:]  # losses logged after the checkpoint are recomputed
        self.meta["phase"], self.meta["iteration"] = phase.index, start
        self.meta.setdefault("names", {})[str(phase.index)] = phase.name
        bar = None
        if self.dist.main:
            from tqdm import tqdm

            bar = tqdm(
                total=phase.iters,
                initial=start,
                desc=phase.name,
                mininterval=2.0,
                dynamic_ncols=True,
                leave=True,
            )
        t0 = time.perf_counter()
        seconds0 = self.meta["seconds"].get(str(phase.index), 0.0)
        for it in range(start, phase.iters):
            if self.stop_after is not None and self.iterations_run >= self.stop_after:
                if bar:
                    bar.close()
                raise StopRequested(
                    f"stopped after {self.iterations_run} iterations "
                    f"(phase {phase.index}, iteration {it}); continue with --resume"
                )
            gen = iteration_generator(self.seed, phase.index, it, self.dist.rank, self.dist.device)
            if self.draw is not None:
                x0, cond = self.draw(gen, self.local_batch)
            else:
                assert self.data is not None
                idx = torch.randint(
                    0, len(self.data), (self.local_batch,), generator=gen, device=self.dist.device
                )
                x0 = self.data[idx.to(self.data.device)].to(self.dist.device)
                cond = take(self.cond, idx, self.dist.device)
            # linear decay to 0 over the phase (Salimans & Ho 2022, Sec. 4: lr annealed per round)
            for g in opt.param_groups:
                g["lr"] = phase.lr * (1.0 - it / phase.iters) if phase.anneal else phase.lr
            loss = phase.loss_fn(net, x0, gen, cond)
            value = loss.detach().clone()
            if self.dist.enabled:
                torch.distributed.all_reduce(value)
                value /= self.dist.world
            if not math.isfinite(float(value)):
                if bar:
                    bar.close()
                good = (
                    f"last good checkpoint is {self.state_path} (lower --lr and run again with --resume)"
                    if self.checkpointed
                    else "no checkpoint was written yet (lower --lr and run again)"
                )
                raise TrainingDiverged(
                    f"loss is {float(value)} at {phase.name}, iteration {it}: stopped; {good}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            opt.step()
            if phase.after_step is not None:
                phase.after_step()
            losses.append(float(value))
            self.iterations_run += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{float(value):.4g}", refresh=False)
            if (it + 1) % self.checkpoint_every == 0 and it + 1 < phase.iters:
                self.meta["seconds"][str(phase.index)] = seconds0 + time.perf_counter() - t0
                self.checkpoint(key, phase, it + 1, opt)
                _fault_after_checkpoint(self.iterations_run)
        if bar:
            bar.close()
        self.meta["seconds"][str(phase.index)] = seconds0 + time.perf_counter() - t0
        return losses

    def finish_phase(
        self,
        key: dict[str, Any],
        phase: Phase,
        next_modules: dict[str, nn.Module],
        record: dict[str, Any] | None,
    ) -> None:
        """Checkpoint the start of the next phase (weights only) with this phase's record."""
        if record is not None:
            self.meta["records"].append(record)
        nxt = Phase(phase.index + 1, "", 1, 0.0, phase.trainable, phase.loss_fn, next_modules)
        self.resume_tensors = None
        self.checkpoint(key, nxt, 0, None)
