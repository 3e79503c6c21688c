"""trainer.py on CPU: bitwise resume after SIGKILL, crash-safe saves, torchrun with a world-size change,
parameter groups and the schedule. The runs are tests/toy_train.py subprocesses (a few seconds each)."""
import argparse
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import trainer
from tests import toy_train
from tests.toy_train import Collate, ToyDataset, ToyModel, make_batches

REPO = Path(__file__).resolve().parents[1]
# 48 samples + 1 broken in micro-batches of 4 -> 13 micro-batches per epoch; grad_accum 2 -> 7 steps per epoch
TOY_ARGS = ["--swanlab_mode", "disabled", "--num_workers", "0", "--batch_size", "4", "--grad_accum", "2",
            "--epochs", "2", "--save_every", "3", "--lr", "3e-3", "--warmup_steps", "2", "--log_every", "5"]
TOTAL_STEPS, SEED = 14, 42


def run_toy(out, *extra, nproc=1, expect_rc=0):
    """Later flags override TOY_ARGS (argparse keeps the last value)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + ["-m", "tests.toy_train", "--out", str(out), *TOY_ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every run -> bitwise comparable
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == expect_rc, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def straight_run(out: Path) -> Path:
    run_toy(out)
    return out


def crash_chain(out: Path) -> dict:
    """SIGKILL after a random step; resume and SIGKILL in the middle of the next save; resume to the end.
    swanlab logs offline in the first and last run; the middle one carries the run id through its checkpoints."""
    kill_at = random.Random(0).choice([s for s in range(4, TOTAL_STEPS - 2) if s % 3])  # not a save step:
    kill_in_save = (kill_at // 3 + 1) * 3  # the resume redoes some steps; its first save is then interrupted
    auto = ["--resume", "auto"]  # on an empty folder: a fresh start
    run_toy(out, *auto, "--swanlab_mode", "offline", "--kill_at_step", str(kill_at), expect_rc=-signal.SIGKILL)
    run_toy(out, *auto, "--kill_in_save_at", str(kill_in_save), expect_rc=-signal.SIGKILL)
    latest = out / (out / "latest").read_text().strip()
    after_crash = {"latest": latest.name, "entries": sorted(p.name for p in out.iterdir()),
                   "latest_step": trainer_state(latest)["step"],
                   "latest_keys": sorted(load_file(str(latest / "model.safetensors")))}
    final = run_toy(out, *auto, "--swanlab_mode", "offline")
    return {"out": out, "kill_in_save": kill_in_save, "after_crash": after_crash, "stdout": final.stdout}


def world_size_chain(out: Path) -> dict:
    """torchrun with 2 ranks for 5 steps (all of epoch 0, its last step padded, + 1 step of epoch 1), then
    1 rank resumes for the 9 micro-batches left (5 steps), with DataLoader workers this time."""
    run_toy(out, "--log_batches", "--max_steps", "5", "--dropout", "0", "--dump_grads", nproc=2)
    first, grads = trainer_state(out / "step_5"), torch.load(out / "grads.pt")
    run_toy(out, "--log_batches", "--resume", "auto", "--num_workers", "2")
    return {"out": out, "first": first, "second": trainer_state(out / "step_10"), "grads": grads}


SEQUENCES = {"straight": straight_run, "crashed": crash_chain, "world_size": world_size_chain}


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    """Starts the run sequences that the selected tests use, in background threads before any test, so they
    overlap each other and the in-process tests (each run is mostly torch start-up). Tests wait for the result
    they need, so a failure stays with its own tests. Meanwhile this process uses one thread."""
    needed = {name for item in request.session.items for name in item.fixturenames} & SEQUENCES.keys()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ThreadPoolExecutor(len(SEQUENCES)) as pool:
        yield {name: pool.submit(SEQUENCES[name], tmp_path_factory.mktemp(name)) for name in sorted(needed)}
    torch.set_num_threads(threads)


@pytest.fixture
def straight(runs):
    return runs["straight"].result()


@pytest.fixture
def crashed(runs):
    return runs["crashed"].result()


@pytest.fixture
def world_size(runs):
    return runs["world_size"].result()


# ----------------------------------------------------------------------------- in-process (run first)
def toy_args(out, *extra):
    return toy_train.parse_args(["--out", str(out), *TOY_ARGS, "--epochs", "1", *extra])


def fit_toy(args) -> dict:
    return {k: v.clone() for k, v in toy_train.train(args).model.state_dict().items()}


def test_resave_after_latest_lags_behind(tmp_path):
    """A crash between publishing step_6 and repointing `latest` leaves latest -> step_3: resuming redoes steps
    4-7 and re-saves over the existing step_6, ending with the same weights."""
    first = fit_toy(toy_args(tmp_path, "--keep_last", "3"))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_3", "step_6", "step_7"]
    (tmp_path / "latest").write_text("step_3\n")
    again = fit_toy(toy_args(tmp_path, "--keep_last", "3", "--resume", "auto"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (tmp_path / "latest").read_text().strip() == "step_7"


def test_gradient_is_the_mean_over_real_micro_batches(tmp_path):
    """grad_accum 6 puts the broken micro-batch (position 5 of epoch 0) in step 1: the step's gradient must be
    the mean over its 5 real micro-batches, computed here by hand from the same initial weights."""
    args = toy_args(tmp_path, "--grad_accum", "6", "--max_steps", "1", "--dropout", "0", "--clip_grad", "0",
                    "--dump_grads")
    got = toy_train.train(args).grads[0]
    trainer.seed_everything(SEED)
    model = ToyModel(dropout=0.0)
    batches = make_batches(0, 4, SEED)[:6]
    assert batches[5] == [toy_train.BROKEN]
    real = [Collate()([ToyDataset()[i] for i in indices]) for indices in batches[:5]]
    for batch in real:
        (model(**batch)["loss"] / len(real)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7)


def test_logged_scalars_average_over_the_batches_that_report_them():
    """standin_loss 0.6 in one of three micro-batches (the only one with scenes) logs as 0.6, not 0.2."""
    window = {"loss_sum": 6.0, "n_real": 3.0, "standin_loss_sum": 0.6, "standin_loss_count": 1,
              "acc_sum": 2.4, "acc_count": 3}
    assert trainer.scalar_means(window) == pytest.approx({"standin_loss": 0.6, "acc": 0.8})


def test_frozen_modules_run_in_eval_mode(tmp_path):
    model = toy_train.train(toy_args(tmp_path, "--max_steps", "1")).model
    assert model.training and model.block.training and not model.frozen.training


def test_fresh_run_refuses_folder_with_checkpoints(tmp_path):
    fit_toy(toy_args(tmp_path, "--max_steps", "1"))
    with pytest.raises(FileExistsError):
        fit_toy(toy_args(tmp_path))


def test_resume_checks_trainable_names(tmp_path):
    fit_toy(toy_args(tmp_path, "--max_steps", "1"))
    model = ToyModel()
    model.frozen.requires_grad_(True)
    with pytest.raises(KeyError, match="frozen"):
        trainer.Trainer(toy_args(tmp_path, "--resume", "auto"), model, ToyDataset(), Collate(),
                        lambda e: make_batches(e, 4, SEED))


def test_rank_micro_batches_partition_the_rest_of_the_epoch():
    for n in range(8):
        batches = [[i] for i in range(n)]
        for pos in range(n + 1):
            for world in (1, 2, 3):
                shares = [trainer.rank_micro_batches(batches, pos, r, world) for r in range(world)]
                assert len({len(s) for s in shares}) == 1
                got = sorted(b[0] for s in shares for b in s if b)
                assert got == list(range(pos, n))
                assert [b for s in zip(*shares) for b in s if b] == batches[pos:]  # global order kept


class Omni(nn.Module):
    def __init__(self):
        super().__init__()
        self.llm = nn.ModuleDict({"layer": nn.Linear(4, 4), "norm": nn.LayerNorm(4), "lm_head": nn.Linear(4, 8)})
        self.resampler = nn.Linear(4, 4)
        self.vision = nn.Linear(4, 4).requires_grad_(False)


def test_param_groups_per_component_lr_and_no_decay():
    model = Omni()
    lr_for = {"llm.": 1e-5, "llm.lm_head.": 2e-5, "resampler.": 1e-2}
    opt = torch.optim.AdamW(trainer.param_groups(model, 1e-3, lr_for, weight_decay=0.1))
    got = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for n in g["param_names"]}
    assert got == {"llm.layer.weight": (1e-5, 0.1), "llm.layer.bias": (1e-5, 0.0),
                   "llm.norm.weight": (1e-5, 0.0), "llm.norm.bias": (1e-5, 0.0),
                   "llm.lm_head.weight": (2e-5, 0.1), "llm.lm_head.bias": (2e-5, 0.0),
                   "resampler.weight": (1e-2, 0.1), "resampler.bias": (1e-2, 0.0)}  # frozen vision absent
    assert trainer.param_groups(model, 1e-3, {}, 0.1)[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="vision"):
        trainer.param_groups(model, 1e-3, {"vision.": 1e-4})  # frozen: a typo-like prefix must not pass silently


def test_warmup_then_cosine_to_min_lr():
    model = Omni()
    opt = torch.optim.AdamW(trainer.param_groups(model, 1e-3, {"resampler.": 1e-2}))
    sched = trainer.cosine_schedule(opt, total_steps=20, warmup_steps=5, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    base, res = [lr[0] for lr in lrs], [lr[-1] for lr in lrs]
    assert base[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(a >= b for a, b in zip(base[4:], base[5:])) and base[5] < 1e-3
    assert base[-1] == pytest.approx(1e-4)
    assert [r / b for r, b in zip(res, base)] == pytest.approx([10.0] * 20)


def test_lr_for_argument():
    args = trainer.add_common_args(argparse.ArgumentParser()).parse_args(["--lr_for", "llm.=1e-5", "resampler.=3e-4"])
    assert dict(args.lr_for) == {"llm.": 1e-5, "resampler.": 3e-4}
    assert args.swanlab_mode == "offline" and args.dtype == "auto"


def test_single_process_distributed_defaults():
    d = trainer.setup_distributed()
    assert (d.rank, d.world_size) == (0, 1) and trainer.is_main()
    trainer.barrier()


# ----------------------------------------------------------------------------- the subprocess runs
def test_resume_after_sigkill_is_bitwise_identical(straight, crashed):
    assert_same_weights(straight / "final.safetensors", crashed["out"] / "final.safetensors")
    assert trainer_state(crashed["out"] / f"step_{TOTAL_STEPS}")["step"] == TOTAL_STEPS


def test_kill_during_save_keeps_previous_checkpoint(crashed):
    out, s, seen = crashed["out"], crashed["kill_in_save"], crashed["after_crash"]
    assert seen["latest"] == f"step_{s - 3}" and seen["latest_step"] == s - 3
    assert f"ckpt.tmp-{s}" in seen["entries"] and f"step_{s}" not in seen["entries"]  # half-written, unpublished
    assert seen["latest_keys"] and not any(k.startswith("frozen.") for k in seen["latest_keys"])
    assert f"resumed from {out / f'step_{s - 3}'}" in crashed["stdout"]
    assert not list(out.glob("ckpt.tmp-*"))  # the leftover was cleaned by the resumed run
    assert (out / "latest").read_text().strip() == f"step_{TOTAL_STEPS}"
    assert len(list(out.glob("step_*"))) == 2  # --keep_last 2


def test_swanlab_run_continues_after_resume(crashed):
    out = crashed["out"]
    run_ids = {trainer_state(d)["swanlab_run_id"] for d in out.glob("step_*")}
    assert len(run_ids) == 1 and None not in run_ids
    run_id = run_ids.pop()
    run_dirs = list((out / "swanlog").glob("run-*"))  # one folder per process, all with the same run id
    assert len(run_dirs) >= 2 and all(d.name.endswith(run_id) for d in run_dirs)


def test_frozen_params_not_in_checkpoint(straight):
    ckpt = straight / f"step_{TOTAL_STEPS}"
    model = ToyModel()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(load_file(str(ckpt / "model.safetensors"))) == sorted(trainable)
    assert trainer_state(ckpt)["trainable"] == trainable
    assert not any(n.startswith("frozen.") for n in trainable) and any(n.startswith("frozen.") for n, _ in
                                                                        model.named_parameters())


def test_torchrun_two_ranks_then_one_rank_sees_every_batch_once(world_size):
    first, second, out = world_size["first"], world_size["second"], world_size["out"]
    assert (first["step"], first["epoch"], first["pos"], first["world_size"]) == (5, 1, 4, 2)
    assert (second["step"], second["epoch"], second["pos"], second["world_size"]) == (10, 2, 0, 1)
    seen = Counter(line for f in out.glob("seen.*.txt") for line in f.read_text().splitlines())
    expected = Counter(",".join(map(str, b)) for epoch in range(2) for b in make_batches(epoch, 4, SEED))
    assert seen == expected


def test_two_rank_gradients_equal_one_rank_gradients(world_size, tmp_path):
    """DDP averaging, the loss weights, the padded last step of epoch 0 (rank 1 replays a batch with weight 0)
    and the step with a skipped micro-batch all give the mean gradient over the step's real micro-batches.
    The reference runs the same 5 steps in-process on 1 rank with twice the accumulation."""
    one = toy_train.train(toy_args(tmp_path, "--epochs", "2", "--max_steps", "5", "--dropout", "0",
                                   "--grad_accum", "4", "--dump_grads")).grads
    two = world_size["grads"]
    assert len(two) == len(one) == 5
    for g2, g1 in zip(two, one):
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-7)
