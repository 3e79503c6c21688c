"""Training machinery shared by the stage scripts (pretrain/align, SFT, DPO): DDP, data order, optimizer,
schedule, logging and atomic, resumable checkpoints. Model-agnostic: it only needs `model(**batch)["loss"]`.

Read top to bottom: command-line arguments, distributed setup, optimizer + schedule, data order, checkpoint
files, logging, then the Trainer that ties them together.

Data order. The dataset side gives a pure function `batches_fn(epoch) -> list of index lists` (one list per
micro-batch, e.g. length-grouped): the same for every rank, run and world size. Within an epoch the GLOBAL
position `pos` counts the micro-batches already consumed. Rank r of W takes micro-batches pos+r, pos+r+W, ...;
one optimizer step consumes grad_accum * W of them. Checkpoints store (epoch, pos), so `--resume` continues at
exactly the next micro-batch even if W changed: no sample is skipped or repeated, but the effective batch per
optimizer step (grad_accum * W micro-batches) and the number of steps left change with W. DataLoader workers
are re-created on resume, so random augmentation should be drawn from (seed, epoch, index), not a global RNG.

Empty micro-batches. A rank can be left without data: past the end of the epoch (the last step's micro-batches
do not divide evenly over the ranks) or when the collate drops every sample and returns None. Every rank still
runs the same number of forward/backward passes, otherwise DDP's gradient all-reduce would hang: a rank without
data replays its last real batch with the loss multiplied by 0. The gradient is then re-normalised to the mean
over the real micro-batches of the step (counted across all ranks), and a step without any real micro-batch
skips the optimizer update.

Checkpoints. out/step_<N>/ holds model.safetensors (only the trainable parameters: frozen pretrained parts are
rebuilt from --init on resume) and trainer.pt (optimizer, scheduler, step, epoch, pos, world size, per-rank RNG
states, swanlab run id, args). A save writes out/ckpt.tmp-<N>/, renames it to out/step_<N>/ and then atomically
rewrites out/latest, so a crash at any moment leaves the previous checkpoint loadable.
"""
import argparse
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm


# ----------------------------------------------------------------------------- command line
def _lr_pair(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected PREFIX=LR (e.g. resampler.=1e-3), got {text!r}")
    return name, float(value)


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments every stage script shares; the script adds its own (data, --init, model options)."""
    g = parser.add_argument_group("training")
    g.add_argument("--out", default="out/run", help="run folder: checkpoints, logs, swanlab files")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=0, help="total optimizer steps (0 = run all epochs)")
    g.add_argument("--batch_size", type=int, default=8, help="samples per micro-batch (per rank)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per rank per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate of parameters without an override")
    g.add_argument("--lr_for", type=_lr_pair, nargs="*", default=[], metavar="PREFIX=LR",
                   help="per-component lr by parameter-name prefix, e.g. llm.=1e-5 resampler.=1e-3")
    g.add_argument("--warmup_ratio", type=float, default=0.03)
    g.add_argument("--warmup_steps", type=int, default=0, help="overrides --warmup_ratio when > 0")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to lr * min_lr_ratio")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--clip_grad", type=float, default=1.0, help="max grad norm (0 = no clipping)")
    g.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep_last", type=int, default=2, help="checkpoints to keep (0 = all)")
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--resume", default="", help="checkpoint folder, or 'auto' = out/latest (fresh if none)")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU (weights stay fp32)")
    g.add_argument("--swanlab_mode", choices=["offline", "disabled", "online", "local"], default="offline")
    g.add_argument("--swanlab_project", default="minicpm-o-scratch")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")
    return parser


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def setup_distributed() -> Dist:
    """Reads torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); a plain `python script.py` is rank 0 of 1.
    NCCL on GPU, gloo on CPU. Safe to call more than once."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, local_rank, world, device)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- optimizer + schedule
def param_groups(model: torch.nn.Module, lr: float, lr_for: dict[str, float] | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups over the trainable parameters. A parameter's lr comes from the LONGEST matching name prefix
    in `lr_for` (e.g. {"llm.": 1e-5, "resampler.": 1e-3}), else `lr`. Biases, norms and other 1-D tensors
    get no weight decay (decaying a norm's gain towards 0 only hurts)."""
    lr_for = lr_for or {}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = max((k for k in lr_for if name.startswith(k)), key=len, default="")
        decay = p.ndim >= 2 and "norm" not in name.lower()
        key = (prefix, decay)
        if key not in groups:
            groups[key] = {"params": [], "name": prefix.rstrip(".") or "base", "lr": lr_for.get(prefix, lr),
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append((name, p))  # named params: the optimizer keeps group["param_names"]
    unused = [k for k in lr_for if k not in {prefix for prefix, _ in groups}]
    if unused:
        raise ValueError(f"--lr_for prefixes {unused} match no trainable parameter")
    return list(groups.values())


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """lr multiplier: linear warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    peak = max(warmup, 1) - 1  # the last step at the full lr
    progress = min(1.0, (step - peak) / max(1, total - 1 - peak))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, min_lr_ratio))


# ----------------------------------------------------------------------------- data order
def rank_micro_batches(batches: list, pos: int, rank: int, world: int) -> list:
    """This rank's micro-batches from global position `pos`: batches[pos + rank], batches[pos + rank + world], ...
    padded with [] so that every rank gets the same count, ceil((len(batches) - pos) / world)."""
    rounds = -(-(len(batches) - pos) // world)
    return [batches[i] if i < len(batches) else [] for i in range(pos + rank, pos + rounds * world, world)]


class _SkipEmpty:
    """Wraps the dataset's collate: a padding micro-batch ([] indices) becomes None without calling it."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items):
        return self.collate_fn(items) if items else None


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- checkpoint files
def _step_dirs(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a step_<N> folder only exists once complete: it is renamed into place)."""
    dirs = [d for d in out.glob("step_*") if d.is_dir() and d.name[5:].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def find_checkpoint(out: str | Path, resume: str) -> Path | None:
    """--resume value -> checkpoint folder. 'auto' reads out/latest (falling back to the newest step_<N>) and
    returns None for a fresh run folder, so the same command line both starts and restarts a job."""
    if not resume:
        return None
    if resume != "auto":
        if not (Path(resume) / "trainer.pt").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer.pt)")
        return Path(resume)
    out = Path(out)
    latest = out / "latest"
    if latest.is_file() and (out / latest.read_text().strip()).is_dir():
        return out / latest.read_text().strip()
    dirs = _step_dirs(out)
    return dirs[-1] if dirs else None


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- logging
def init_swanlab(args, run_id: str | None):
    """Rank 0 only. Offline by default; `online` without a login falls back to offline instead of crashing.
    Passing the saved run id makes a resumed job continue the same swanlab run."""
    if args.swanlab_mode == "disabled":
        return None
    import swanlab
    kwargs = dict(project=args.swanlab_project, name=Path(args.out).name, config=vars(args),
                  log_dir=str(Path(args.out) / "swanlog"), id=run_id, resume="allow" if run_id else None)
    try:
        return swanlab.init(mode=args.swanlab_mode, **kwargs)
    except Exception as e:  # e.g. "no TTY is available for interactive login"
        print(f"swanlab {args.swanlab_mode} mode failed ({e}); logging offline instead")
        return swanlab.init(mode="offline", **kwargs)


# ----------------------------------------------------------------------------- the trainer
def scalar_means(window: dict) -> dict:
    """The model's extra scalars over a log window: each one's mean over rank 0's micro-batches that REPORTED it
    (standin_loss exists only in batches with scenes; averaging over all batches would understate it)."""
    return {k[:-4]: v / window[k[:-4] + "_count"] for k, v in window.items() if k.endswith("_sum") and k != "loss_sum"}


class Trainer:
    """trainer = Trainer(args, model, dataset, collate_fn, batches_fn); trainer.fit()

    model: nn.Module; model(**batch) returns a dict with "loss" (mean over the micro-batch), optionally
        "num_tokens" (for tokens/s) and other scalars (logged, averaged over rank 0's micro-batches).
        Only parameters with requires_grad train and are checkpointed; every one of them must get a gradient
        from every batch (DDP runs with find_unused_parameters=False).
    dataset[i] -> sample; collate_fn(list of samples) -> batch dict, or None to skip the micro-batch.
    batches_fn(epoch) -> list of index lists, see "Data order" above.
    lr_for: {name prefix: lr} overrides added to --lr_for.
    Sub-modules whose parameters are all frozen run in eval mode (no dropout) during fit().
    Subclasses may override on_step_end() (e.g. evaluation); `trainer.model` is the unwrapped model.
    """

    def __init__(self, args, model, dataset, collate_fn, batches_fn, lr_for: dict[str, float] | None = None):
        self.args, self.dataset, self.collate_fn, self.batches_fn = args, dataset, collate_fn, batches_fn
        self.dist = setup_distributed()
        self.out = Path(args.out)
        self.model = model.to(self.dist.device)
        if args.grad_checkpointing:
            self._enable_grad_checkpointing()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        lrs = {**dict(args.lr_for), **(lr_for or {})}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.lr, lrs, args.weight_decay),
                                           betas=(0.9, 0.95))
        bf16 = args.dtype == "bf16" or (args.dtype == "auto" and self.dist.device.type == "cuda")
        self.autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.step = self.epoch = self.pos = 0
        self.run_id, self.rng_to_restore, self.fallback = None, None, None

        ckpt = find_checkpoint(self.out, args.resume)
        if not ckpt and _step_dirs(self.out):
            raise FileExistsError(f"{self.out} already holds checkpoints: pass --resume auto or use a new --out")
        state = self._load(ckpt) if ckpt else None
        self.last_saved = self.step if ckpt else -1
        self.total_steps = self._count_total_steps()
        warmup = args.warmup_steps or int(args.warmup_ratio * self.total_steps)
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, warmup, args.min_lr_ratio)
        if state:  # after the scheduler: building it resets the groups' lr, the saved optimizer state restores it
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = DDP(self.model, device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None,
                           find_unused_parameters=False)
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            for tmp in self.out.glob("ckpt.tmp-*"):  # left over by a crash during a save
                shutil.rmtree(tmp, ignore_errors=True)
            if ckpt:
                print(f"resumed from {ckpt}: step {self.step}, epoch {self.epoch}, micro-batch {self.pos}")

    def _enable_grad_checkpointing(self):
        """Modules opt in by having a `gradient_checkpointing` attribute (as our Qwen3 decoder does)."""
        modules = [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]
        if not modules:
            raise ValueError("--grad_checkpointing: no module of this model has a `gradient_checkpointing` flag")
        for m in modules:
            m.gradient_checkpointing = True

    def _count_total_steps(self) -> int:
        """Optimizer steps from step 0 to the end: the steps done + those left at the CURRENT world size."""
        per_step = self.args.grad_accum * self.dist.world_size
        total = self.step
        for epoch in range(self.epoch, self.args.epochs):
            left = len(self.batches_fn(epoch)) - (self.pos if epoch == self.epoch else 0)
            total += -(-left // per_step)
        return min(total, self.args.max_steps) if self.args.max_steps > 0 else total

    # ---- the loop
    def fit(self):
        args, world = self.args, self.dist.world_size
        self.ddp.train()
        for m in self.model.modules():  # fully frozen parts (pretrained towers, a DPO reference) run in eval mode
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()
        logger = init_swanlab(args, self.run_id) if is_main() else None
        self.run_id = logger.id if logger else self.run_id
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not is_main(), dynamic_ncols=True)
        if self.rng_to_restore:  # restored last, so nothing above shifts the random streams of a resumed run
            set_rng_state(self.rng_to_restore)
        else:  # fresh run, or a resume at another world size: per-rank streams seeded from (seed, step, rank)
            seed_everything(args.seed + 1000 * self.step + self.dist.rank)
        window, t0 = {}, time.perf_counter()
        while self.epoch < args.epochs and self.step < self.total_steps:
            batches = self.batches_fn(self.epoch)
            micro = self._micro_batches(batches)
            while self.pos < len(batches) and self.step < self.total_steps:
                n = min(args.grad_accum * world, len(batches) - self.pos)  # global micro-batches this step
                stats = self._train_step(micro, n, batches)
                self.step, self.pos = self.step + 1, self.pos + n
                for k, v in stats.items():
                    window[k] = window.get(k, 0.0) + v
                bar.update(1)
                if self.step % args.log_every == 0 or self.step == self.total_steps:
                    self._log(window, time.perf_counter() - t0, logger, bar)
                    window, t0 = {}, time.perf_counter()
                if args.save_every and self.step % args.save_every == 0:
                    self.save()
                self.on_step_end()
            if self.pos >= len(batches):
                self.epoch, self.pos = self.epoch + 1, 0
        if self.last_saved != self.step:
            self.save()
        bar.close()
        if logger:
            logger.finish()

    def _micro_batches(self, batches):
        """Iterator of (indices, collated batch or None) over this rank's share of the epoch from self.pos."""
        mine = rank_micro_batches(batches, self.pos, self.dist.rank, self.dist.world_size)
        # Own generator: creating the loader must not draw from the global RNG (resume would shift it).
        gen = torch.Generator().manual_seed(self.args.seed + 1000 * self.epoch + self.dist.rank)
        loader = DataLoader(self.dataset, batch_sampler=mine, collate_fn=_SkipEmpty(self.collate_fn),
                            num_workers=self.args.num_workers, pin_memory=self.dist.device.type == "cuda",
                            generator=gen)
        return zip(mine, loader)

    def _train_step(self, micro, n: int, batches) -> dict:
        """One optimizer step over n global micro-batches (ceil(n / W) per rank, the last ones maybe empty)."""
        world = self.dist.world_size
        rounds = -(-n // world)
        weight = world / n  # DDP averages over ranks: sum of loss * W / n over ranks = mean over the n batches
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(4, device=self.dist.device)  # loss sum, real micro-batches, samples, tokens
        extras = {}  # scalar outputs besides the loss: key -> (sum, micro-batches that reported it)
        for k in range(rounds):
            indices, batch = next(micro)
            real = batch is not None
            if real:
                self.fallback = batch
            elif self.fallback is None:
                self.fallback = self._first_real_batch(batches)
            sync = k == rounds - 1 or world == 1
            with nullcontext() if sync else self.ddp.no_sync():
                with self.autocast:
                    out = self.ddp(**to_device(batch if real else self.fallback, self.dist.device))
                (out["loss"] * (weight if real else 0.0)).backward()
            if real:
                tokens = torch.as_tensor(out.get("num_tokens", 0), device=stats.device).float()
                stats += torch.stack([out["loss"].detach().float(), stats.new_tensor(1.0),
                                      stats.new_tensor(float(len(indices))), tokens])
                for key, v in out.items():
                    if key not in ("loss", "num_tokens") and torch.is_tensor(v) and v.numel() == 1:
                        total, count = extras.get(key, (0.0, 0))
                        extras[key] = (total + v.detach().float(), count + 1)
        if world > 1:
            dist.all_reduce(stats)
        loss_sum, n_real, samples, tokens = stats.tolist()
        if 0 < n_real < n:  # some micro-batches were empty: the mean is over the real ones only
            for p in self.trainable.values():
                if p.grad is not None:
                    p.grad.mul_(n / n_real)
        max_norm = self.args.clip_grad if self.args.clip_grad > 0 else float("inf")  # inf: just measure
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), max_norm))
        if n_real > 0:
            self.optimizer.step()
        self.scheduler.step()
        stats = {"loss_sum": loss_sum, "n_real": n_real, "samples": samples, "tokens": tokens,
                 "grad_norm": grad_norm, "steps": 1}
        for k, (total, count) in extras.items():
            stats[f"{k}_sum"], stats[f"{k}_count"] = float(total), count
        return stats

    def _first_real_batch(self, batches) -> dict:
        """A stand-in for a rank that has had no data yet: the epoch's first batch that collates to something."""
        for indices in batches:
            batch = self.collate_fn([self.dataset[i] for i in indices])
            if batch is not None:
                return batch
        raise RuntimeError("every micro-batch of the epoch collated to None")

    def _log(self, window: dict, seconds: float, logger, bar):
        if not is_main() or not window:
            return
        n_real = max(window["n_real"], 1.0)
        logs = {"train/loss": window["loss_sum"] / n_real, "train/grad_norm": window["grad_norm"] / window["steps"],
                "train/samples_per_s": window["samples"] / seconds, "train/tokens_per_s": window["tokens"] / seconds,
                "train/epoch": self.epoch}
        logs.update({f"train/{k}": v for k, v in scalar_means(window).items()})
        logs.update({f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
        if logger:
            logger.log(logs, step=self.step)
        bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
        bar.write(f"step {self.step}/{self.total_steps} | " + " | ".join(
            f"{k.removeprefix('train/').replace('/', '_')} {v:.4g}" for k, v in logs.items()))

    def on_step_end(self):
        """Hook called on every rank after each optimizer step (and its checkpoint, if any)."""

    # ---- checkpoints
    def save(self):
        """Collective: every rank calls it (the RNG-state gather and the final barrier sync them); rank 0 writes."""
        states = [rng_state()]
        if self.dist.world_size > 1:
            states = [None] * self.dist.world_size
            dist.all_gather_object(states, rng_state())
        if is_main():
            tmp = self.out / f"ckpt.tmp-{self.step}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable.items()},
                      str(tmp / "model.safetensors"))
            torch.save({"trainable": list(self.trainable), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                        "pos": self.pos, "world_size": self.dist.world_size, "rng": states,
                        "swanlab_run_id": self.run_id, "args": vars(self.args)}, tmp / "trainer.pt")
            for f in tmp.iterdir():  # on disk before the rename publishes them (matters on power loss)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            self.commit_checkpoint(tmp, self.out / f"step_{self.step}")
        self.last_saved = self.step
        barrier()

    def commit_checkpoint(self, tmp: Path, final: Path):
        """Publish a fully written checkpoint: rename the folder into place, then repoint `latest`, then prune."""
        if final.exists():  # re-saving a step after resuming from an older checkpoint
            old = final.with_name(f"ckpt.tmp-old-{final.name}")
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _write_atomic(self.out / "latest", final.name + "\n")
        for d in _step_dirs(self.out)[:-self.args.keep_last]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)

    def _load(self, ckpt: Path) -> dict:
        """Trainable weights + counters now; the optimizer/scheduler state is returned and loaded by __init__."""
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)  # our own file
        weights = load_file(str(ckpt / "model.safetensors"))
        missing = [n for n in self.trainable if n not in weights]
        unexpected = [n for n in weights if n not in self.trainable]
        if missing or unexpected or list(self.trainable) != state["trainable"]:
            raise KeyError(f"checkpoint {ckpt} does not match the model's trainable parameters "
                           f"(missing: {missing[:10]}, unexpected: {unexpected[:10]}); "
                           f"freeze/unfreeze the same components as the run that saved it")
        self.model.load_state_dict(weights, strict=False)  # frozen weights stay as built; shapes are checked
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.run_id = state["swanlab_run_id"]
        rank = self.dist.rank
        same_world = state["world_size"] == self.dist.world_size
        self.rng_to_restore = state["rng"][rank] if same_world else None  # else fit() reseeds per rank
        return state
