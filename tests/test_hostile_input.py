"""Every bad input of docs/hostile-input.md, and what the user gets: each table row is one case here.

The table is rendered from these cases (``python tests/test_hostile_input.py``
rewrites it), so the docs show the messages users really get. Each case must
raise a ``ValueError``/``TypeError``/``KeyError`` (or, for the command, exit
with status 2 and a message) naming what was wrong; a torch error from a bad
batch must carry the note that says which batch. Loads must leave the objects
as they were.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from engine_opt import (
    AmpOptimWrapper,
    OptimWrapper,
    OptimWrapperDict,
    StepEvent,
    build_optim_wrapper,
    create_trainer,
    member_filter,
)
from engine_opt.app import cli
from engine_opt.checkpoint import (
    attach_checkpoint,
    attach_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    resume_from_latest,
)
from engine_opt.checkpoint.manifest import write_manifest
from engine_opt.checkpoint.sharded_files import ShardedLayout, save_sharded
from engine_opt.engine import ResumableLoader, rng_state
from engine_opt.handlers import NonFiniteGuard, SchedulerHandler, SpikeGuard

if __name__ == "__main__":  # run as a script (the table's rewrite): pytest's conftest.py is not there to do it
    sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from oracle import assert_same_tensors, make_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "hostile-input.md"
TABLE_START = "<!-- table: rendered by tests/test_hostile_input.py -->"
TABLE_END = "<!-- end of table -->"
# torch's own words inside a message: the table shows them, the staleness check does not compare them (they change
# with torch releases, ours do not).
TORCH_WORDS = [
    (
        re.compile(r"\| RuntimeError: .*? \\\[note: engine_opt:"),
        "| RuntimeError: (torch's message) \\[note: engine_opt:",
    ),
    (re.compile(r"not written by torch\.save \(.*\) \|$"), "not written by torch.save (torch's message) |"),
]


@dataclass
class Case:
    area: str
    given: str  # what the user did, as it appears in the table
    action: Callable[[], Any]
    names: str  # a fragment the message must hold: the argument, value or file it is about


def sam_fp16_torch_style_closure() -> None:
    """A float16 SAM update whose second pass runs its own (unscaled) backward."""
    model = make_model()
    wrapper = AmpOptimWrapper(optimizer=plain_sgd(model), dtype="float16", sam={"rho": 0.05})
    x = torch.ones(2, 4)

    def closure() -> torch.Tensor:
        loss = model(x).sum()
        loss.backward()
        return loss

    wrapper.update_params(model(x).sum(), closure=closure)


def plain_sgd(model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """A plain SGD (lr 0.1, no momentum) over the model's parameters, or a fresh model's."""
    return torch.optim.SGD((model or make_model()).parameters(), lr=0.1)


def a_trainer() -> Any:
    """A trainer of a fresh model, by its own wrapper (to attach checkpoints to)."""
    model = make_model()
    return create_trainer(model, OptimWrapper(plain_sgd(model)), F.mse_loss)


def wrapper_of(model: torch.nn.Module) -> OptimWrapper:
    return OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01))


def trained(model: torch.nn.Module, wrapper: OptimWrapper) -> None:
    wrapper.update_params(model(torch.ones(2, 4)).sum())


def unchanged_after(objects: dict[str, Any], load: Callable[[], Any]) -> None:
    """Run ``load``, which must fail; check that it changed none of ``objects``; re-raise its error."""
    before = {name: copy.deepcopy(obj.state_dict()) for name, obj in objects.items()}
    try:
        load()
    except Exception:
        for name, obj in objects.items():
            assert_same_tensors(obj.state_dict(), before[name], name)
        raise
    raise AssertionError("the load did not fail")


def saved_run(path: str) -> None:
    """A real checkpoint of a model, its wrapper and its trainer, at ``path``."""
    model = make_model()
    wrapper = wrapper_of(model)
    trained(model, wrapper)
    trainer = create_trainer(model, wrapper, F.mse_loss)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "optim_wrapper": wrapper.state_dict(), "trainer": trainer.state_dict()}, path
    )


def load_into_fresh(path: str, model: torch.nn.Module | None = None, extra: dict[str, Any] | None = None) -> None:
    model = model or make_model(seed=3)
    wrapper = wrapper_of(model)
    trained(model, wrapper)
    to_load = {"model": model, "optim_wrapper": wrapper, **(extra or {})}
    unchanged_after({"model": model, "optim_wrapper": wrapper}, lambda: load_checkpoint(to_load, path))


def file_with(path: str, content: bytes) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(content)
    return path


def truncated(path: str) -> str:
    saved_run(path)
    data = Path(path).read_bytes()
    return file_with(path, data[: len(data) // 2])


def corrupted(path: str) -> str:
    saved_run(path)
    data = bytearray(Path(path).read_bytes())
    for index in range(len(data) // 3, len(data) // 3 + 64):
        data[index] ^= 0xFF
    return file_with(path, bytes(data))


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo this should never run",))


def flipped_tensor_bytes(path: str) -> str:
    """Flip 4 bytes inside the largest tensor's data: the file still parses, only its CRC tells."""
    saved_run(path)
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    data = bytearray(Path(path).read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length
    for index in range(start, start + 4):
        data[index] ^= 0xFF
    return file_with(path, bytes(data))


def pickled_code(path: str) -> str:
    return file_with(path, pickle.dumps({"model": Exploit()}, protocol=2))


def other_model_optimizer_state() -> None:
    wide = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.LayerNorm(9), torch.nn.ReLU(), torch.nn.Linear(9, 2))
    wide_wrapper = wrapper_of(wide)
    trained(wide, wide_wrapper)
    model = make_model()
    wrapper = wrapper_of(model)
    unchanged_after({"optim_wrapper": wrapper}, lambda: wrapper.load_state_dict(wide_wrapper.state_dict()))


def run_trainer(model: torch.nn.Module, loss_fn: Callable[..., Any], batch: Any) -> None:
    create_trainer(model, OptimWrapper(plain_sgd(model)), loss_fn).run([batch])


def command(*args: str) -> None:
    """``engine-opt train ARGS`` in the current directory; a SystemExit carries the message printed."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            cli.main(["train", "--no-progress", "--epochs", "1", *args])
        except SystemExit as error:
            lines = stderr.getvalue().strip().splitlines()
            # the last message, its indented lines (one difference each) joined to it
            start = max((index for index, line in enumerate(lines) if line.startswith("engine-opt")), default=0)
            message = " / ".join(line.strip() for line in lines[start:])
            raise SystemExit(f"exit {error.code}: {message}") from None


def new_run_behind_the_checkpoints_there() -> None:
    Path("later").mkdir()
    torch.save({}, "later/checkpoint_8.pt")
    model = make_model()
    trainer = create_trainer(model, wrapper_of(model), F.mse_loss)
    attach_checkpoint(trainer, {"model": model}, "later", every=1)
    unchanged_after({"model": model}, lambda: trainer.run([(torch.ones(2, 4), torch.ones(2, 2))]))


def a_directory_named_like_a_checkpoint_there() -> None:
    Path("impostor/checkpoint_1.pt").mkdir(parents=True)
    model = make_model()
    trainer = create_trainer(model, wrapper_of(model), F.mse_loss)
    attach_checkpoint(trainer, {"model": model}, "impostor", every=1)
    unchanged_after({"model": model}, lambda: trainer.run([(torch.ones(2, 4), torch.ones(2, 2))]))


def resume_from_a_damaged_newest() -> None:
    command("--log-dir", "runs/damaged", "--checkpoint-every", "32")
    newest = Path("runs/damaged/checkpoints/checkpoint_64.pt")
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 1
    newest.write_bytes(data)
    command("--log-dir", "runs/damaged", "--resume", "--epochs", "2")


def a_command_into_a_directory_named_like_a_checkpoint() -> None:
    Path("runs/impostor/checkpoints/checkpoint_64.pt").mkdir(parents=True)
    command("--log-dir", "runs/impostor")


def with_checkpoints_of_another_run() -> None:
    command("--checkpoint-every", "1000")
    command()


def resume_from_nowhere_over_earlier_logs() -> None:
    command("--log-dir", "runs/logged")
    command("--log-dir", "runs/logged", "--resume", "--epochs", "2", "--checkpoint-dir", "runs/elsewhere")


def resume_a_complete_run() -> None:
    command("--log-dir", "runs/done")
    command("--log-dir", "runs/done", "--resume")


def resume_with_other_options() -> None:
    command("--log-dir", "runs/other")
    command("--log-dir", "runs/other", "--resume", "--task", "gan")


def checkpoint_with(path: str, **changes: Callable[[dict[str, Any]], Any]) -> str:
    """A real checkpoint of saved_run's objects, each entry named in ``changes`` replaced by what its function returns."""
    saved_run(path)
    state = torch.load(path, weights_only=True)
    for name, change in changes.items():
        state[name] = change(state[name])
    torch.save(state, path)
    return path


def an_adamw_state_into_an_adam_wrapper() -> None:
    model = make_model()
    adamw = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01))
    trained(model, adamw)
    adam = OptimWrapper(torch.optim.Adam(model.parameters(), lr=0.01))
    unchanged_after({"optim_wrapper": adam}, lambda: adam.load_state_dict(adamw.state_dict()))


def a_disabled_scalers_state_into_an_enabled_one() -> None:
    saved_run("ckpt/checkpoint_4.pt")
    state = torch.load("ckpt/checkpoint_4.pt", weights_only=True)
    state["scaler"] = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # torch's own, as plain AMP saves it
    torch.save(state, "ckpt/checkpoint_4.pt")
    load_into_fresh("ckpt/checkpoint_4.pt", extra={"scaler": torch.amp.GradScaler("cpu")})


def set_in(mapping: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(mapping)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


def load_full_run(path: str) -> None:
    """load_checkpoint into a fresh model, wrapper, trainer and the extra objects of a run; nothing may change."""
    model = make_model(seed=3)
    wrapper = wrapper_of(model)
    trained(model, wrapper)
    trainer = create_trainer(model, wrapper, F.mse_loss)
    to_load = {"model": model, "optim_wrapper": wrapper, "trainer": trainer}
    unchanged_after({"model": model, "optim_wrapper": wrapper}, lambda: load_checkpoint(to_load, path))


def adamw_state_into_sgd() -> None:
    model = make_model()
    adamw = wrapper_of(model)
    trained(model, adamw)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    unchanged_after({"optim_wrapper": wrapper}, lambda: wrapper.load_state_dict(adamw.optimizer.state_dict()))


def scheduler_entry_of_a_number(path: str) -> None:
    model = make_model(seed=3)
    wrapper = wrapper_of(model)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper.optimizer, step_size=2)
    saved_run(path)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "scheduler": 5}, path)
    to_load = {"model": model, "optim_wrapper": wrapper, "scheduler": scheduler}
    unchanged_after({"model": model, "scheduler": scheduler}, lambda: load_checkpoint(to_load, path))


def a_bad_member_of_a_wrapper_dict() -> None:
    gan = {"gen": make_model(), "disc": make_model(seed=1)}
    wrappers = OptimWrapperDict(**{name: wrapper_of(model) for name, model in gan.items()})
    for name, model in gan.items():
        trained(model, wrappers[name])
    state = wrappers.state_dict()
    state["disc"]["param_groups"][0]["lr"] = float("nan")
    unchanged_after(dict(wrappers.items()), lambda: wrappers.load_state_dict(state))


def a_float64_model_checkpoint() -> None:
    saved_run("ckpt/checkpoint_3.pt")
    state = torch.load("ckpt/checkpoint_3.pt", weights_only=True)
    state["model"] = {key: value.double() for key, value in state["model"].items()}
    torch.save(state, "ckpt/checkpoint_3.pt")
    load_into_fresh("ckpt/checkpoint_3.pt")


def a_nan_loss_scale(path: str) -> None:
    def amp_wrapper(model: torch.nn.Module) -> AmpOptimWrapper:
        return AmpOptimWrapper(optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), dtype="fp16")

    saved = amp_wrapper(make_model()).state_dict()
    saved["loss_scaler"] = {**saved["loss_scaler"], "scale": float("nan")}
    file_with(path, _saved_bytes({"model": make_model().state_dict(), "optim_wrapper": saved}))
    model = make_model(seed=3)
    to_load = {"model": model, "optim_wrapper": amp_wrapper(model)}
    unchanged_after(to_load, lambda: load_checkpoint(to_load, path))


def a_loss_under_no_grad() -> None:
    model = make_model()
    with torch.no_grad():
        loss = model(torch.ones(2, 4)).sum()
    OptimWrapper(plain_sgd(model)).update_params(loss)


def attached_twice() -> None:
    model = make_model()
    trainer = create_trainer(model, OptimWrapper(plain_sgd(model)), F.mse_loss)
    guard = SpikeGuard()
    guard.attach(trainer)
    guard.attach(trainer)


def cancel_when_a_float() -> None:
    model = make_model()
    wrapper = OptimWrapper(plain_sgd(model))
    wrapper.register_step_hook(lambda w, e, loss: w.cancel_step(when=1.0), [StepEvent.BEFORE_OPTIM_STEP])
    wrapper.update_params(model(torch.ones(1, 4)).sum())


def a_directory_another_run_holds() -> None:
    Path("held").mkdir()
    other_run = filelock.FileLock("held/.engine_opt.lock", timeout=0)  # as another process would hold it
    other_run.acquire()
    try:
        model = make_model()
        trainer = create_trainer(model, wrapper_of(model), F.mse_loss)
        attach_checkpoint(trainer, {"model": model}, "held")
        trainer.run([(torch.ones(2, 4), torch.ones(2, 2))])
    finally:
        other_run.release()


def a_command_into_a_directory_another_run_holds() -> None:
    Path("runs/held/checkpoints").mkdir(parents=True)
    other_run = filelock.FileLock("runs/held/checkpoints/.engine_opt.lock", timeout=0)
    with other_run:
        command("--log-dir", "runs/held")


RUN_CONFIG = b"""
import torch
model = torch.nn.Linear(4, 2)
train_dataloader = dict(batch_size=8, dataset=torch.utils.data.TensorDataset(torch.randn(16, 4)))
"""


def a_checkpoint_directory_under_a_file() -> None:
    file_with("plain.txt", b"")
    model = make_model()
    trainer = create_trainer(model, wrapper_of(model), F.mse_loss)
    attach_checkpoint(trainer, {"model": model}, "plain.txt/checkpoints")
    trainer.run([(torch.ones(2, 4), torch.ones(2, 2))])


def resume_with_another_batch_size() -> None:
    command("--log-dir", "runs/batch")
    command("--log-dir", "runs/batch", "--resume", "--epochs", "2", "--batch-size", "32")


def extend_a_cosine_run() -> None:
    command("--log-dir", "runs/cosine", "--schedule", "cosine")
    command("--log-dir", "runs/cosine", "--schedule", "cosine", "--resume", "--epochs", "2")


def another_schedulers_state(path: str) -> None:
    saved_run(path)
    model = make_model()
    state = torch.load(path, weights_only=True)
    step_lr = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), step_size=2)
    torch.save({**state, "scheduler": step_lr.state_dict()}, path)
    fresh = make_model(seed=3)
    wrapper = wrapper_of(fresh)
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapper.optimizer, lambda step: 0.5**step)
    to_load = {"model": fresh, "optim_wrapper": wrapper, "scheduler": scheduler}
    unchanged_after({"model": fresh, "optim_wrapper": wrapper}, lambda: load_checkpoint(to_load, path))


def a_mid_window_state_into_another_accumulation() -> None:
    model = make_model()
    wrapper = OptimWrapper(plain_sgd(model), accumulative_counts=4)
    trained(model, wrapper)  # one micro-step of a window of 4
    other = OptimWrapper(plain_sgd(model), accumulative_counts=2)
    unchanged_after({"optim_wrapper": other}, lambda: other.load_state_dict(wrapper.state_dict()))


def a_data_position_past_the_datas_end() -> None:
    state = ResumableLoader([1, 2, 3, 4, 5, 6]).state_dict() | {"position": 5, "epoch_rng": rng_state()}
    ResumableLoader([1, 2, 3]).load_state_dict(state)


def sharded_run(path: str) -> None:
    """A real sharded checkpoint of a model and its wrapper, in the directory ``path``."""
    model = make_model()
    wrapper = wrapper_of(model)
    trained(model, wrapper)
    save_sharded(ShardedLayout.of({"model": model, "optim_wrapper": wrapper}), Path(path))


def load_sharded_into(path: str, model: torch.nn.Module) -> None:
    wrapper = wrapper_of(model)
    to_load = {"model": model, "optim_wrapper": wrapper}
    unchanged_after(to_load, lambda: load_sharded_checkpoint(to_load, path))


def a_sharded_checkpoint_of_other_layer_sizes() -> None:
    sharded_run("sharded/checkpoint_3")
    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.LayerNorm(9), torch.nn.ReLU(), torch.nn.Linear(9, 2))
    load_sharded_into("sharded/checkpoint_3", other)


def a_sharded_checkpoint_without_its_metadata() -> None:
    sharded_run("sharded/checkpoint_4")
    Path("sharded/checkpoint_4/.metadata").unlink()
    load_sharded_into("sharded/checkpoint_4", make_model())


def a_sharded_checkpoint_whose_metadata_runs_code() -> None:
    sharded_run("sharded/checkpoint_5")
    Path("sharded/checkpoint_5/.metadata").write_bytes(pickle.dumps(Exploit(), protocol=2))
    write_manifest(Path("sharded/checkpoint_5"))  # a planted checkpoint can come with a manifest of its own
    load_sharded_into("sharded/checkpoint_5", make_model())


def a_sharded_checkpoint_with_a_bit_flipped_in_a_shard() -> None:
    sharded_run("sharded/checkpoint_6")
    shard = next(Path("sharded/checkpoint_6").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    load_sharded_into("sharded/checkpoint_6", make_model())


def a_sharded_checkpoint_of_a_wrapper_without_its_model() -> None:
    model = make_model()
    wrapper = wrapper_of(model)
    attach_sharded_checkpoint(create_trainer(model, wrapper, F.mse_loss), {"optim_wrapper": wrapper}, "sharded")


def lbfgs_wrapper(**kwargs: Any) -> OptimWrapper:
    return OptimWrapper(torch.optim.LBFGS(make_model().parameters()), **kwargs)


def lbfgs_update(wrapper: OptimWrapper, **kwargs: Any) -> None:
    model = make_model()
    wrapper.update_params(F.mse_loss(model(torch.ones(2, 4)), torch.ones(2, 2)), **kwargs)


def a_sharded_checkpoint_of_a_schedule_free_optimizer() -> None:
    schedulefree = pytest.importorskip("schedulefree")
    model = make_model()
    wrapper = OptimWrapper(schedulefree.AdamWScheduleFree(model.parameters()))
    trainer = create_trainer(model, wrapper, F.mse_loss)
    attach_sharded_checkpoint(trainer, {"model": model, "optim_wrapper": wrapper}, "sharded_free")


def a_mid_pass_position_of_two_processes_into_one() -> None:
    state = ResumableLoader([1, 2, 3, 4]).state_dict() | {"position": 2, "epoch_rng": rng_state()}
    state["ranks"] = [{"epoch_rng": rng_state(), "rng": rng_state()}] * 2
    ResumableLoader([1, 2, 3, 4]).load_state_dict(state)


def a_data_state_of_two_processes_into_one_that_pads_otherwise() -> None:
    def loader() -> ResumableLoader:
        return ResumableLoader(DataLoader(torch.arange(9), batch_size=3, sampler=DistributedSampler(range(9), 1, 0)))

    state = loader().state_dict()  # between passes, its sampler's order as 2 processes record it
    state["ranks"] = [{"epoch_rng": None, "rng": rng_state()}] * 2
    loader().load_state_dict(state)


def a_num_items_window_of_two_processes_into_one() -> None:
    model = make_model()
    wrapper = wrapper_of(model)
    wrapper.update_params(model(torch.ones(2, 4)).sum(), num_items=2)  # a window of accumulative_counts=2 begun
    state = {key: value for key, value in wrapper.state_dict().items() if not key.startswith("accumulated")}
    state |= {"rank_accumulated_grads": [[p.grad for p in model.parameters()]] * 2, "rank_accumulated_items": [2, 2]}
    fresh = wrapper_of(make_model())
    unchanged_after({"optim_wrapper": fresh}, lambda: fresh.load_state_dict(state))


# fmt: off
CASES = [
    Case("constructor", "`OptimWrapper(model)` (a module, not an optimizer)", lambda: OptimWrapper(make_model()), "Sequential"),
    Case("constructor", "`OptimWrapper(opt, accumulative_counts=0)`", lambda: OptimWrapper(plain_sgd(), accumulative_counts=0), "accumulative_counts"),
    Case("constructor", "`OptimWrapper(opt, sync_each_micro_step='yes')`", lambda: OptimWrapper(plain_sgd(), sync_each_micro_step="yes"), "sync_each_micro_step"),
    Case("constructor", "`OptimWrapper(opt, accumulative_counts=2.5)`", lambda: OptimWrapper(plain_sgd(), accumulative_counts=2.5), "2.5"),
    Case("constructor", "`OptimWrapper(opt, clip_grad={'max_norm': 1, 'typ': 'norm'})`", lambda: OptimWrapper(plain_sgd(), clip_grad={"max_norm": 1, "typ": "norm"}), "typ"),
    Case("constructor", "`OptimWrapper(opt, clip_grad={'type': 'value'})`", lambda: OptimWrapper(plain_sgd(), clip_grad={"type": "value"}), "clip_value"),
    Case("constructor", "`AmpOptimWrapper(opt)` (optimizer passed positionally)", lambda: AmpOptimWrapper(plain_sgd()), "optimizer="),
    Case("constructor", "`AmpOptimWrapper(optimizer=opt, dtype='int8')`", lambda: AmpOptimWrapper(optimizer=plain_sgd(), dtype="int8"), "int8"),
    Case("constructor", "`AmpOptimWrapper(optimizer=opt, loss_scale=-1)`", lambda: AmpOptimWrapper(optimizer=plain_sgd(), loss_scale=-1), "-1"),
    Case("constructor", "`AmpOptimWrapper(optimizer=opt, loss_scale={'growth_factor': 0.5})`", lambda: AmpOptimWrapper(optimizer=plain_sgd(), loss_scale={"growth_factor": 0.5}), "growth_factor"),
    Case("constructor", "`OptimWrapperDict(gen=optimizer)` (not a wrapper)", lambda: OptimWrapperDict(gen=plain_sgd()), "gen"),
    Case("constructor", "`wrappers['generator']` (no such member)", lambda: OptimWrapperDict(gen=OptimWrapper(plain_sgd()))["generator"], "generator"),
    Case("constructor", "`NonFiniteGuard('explode')`", lambda: NonFiniteGuard("explode"), "explode"),
    Case("constructor", "`SpikeGuard(z=0)`", lambda: SpikeGuard(z=0), "z must be"),
    Case("constructor", "`SpikeGuard(k=0)`", lambda: SpikeGuard(k=0), "k must be"),
    Case("constructor", "`SpikeGuard(warmup=-1)`", lambda: SpikeGuard(warmup=-1), "warmup must be"),
    Case("constructor", "`SpikeGuard('undo')`", lambda: SpikeGuard("undo"), "'undo'"),
    Case("constructor", "`SpikeGuard('rollback')` (nothing to restore)", lambda: SpikeGuard("rollback"), "restore"),
    Case("constructor", "`SpikeGuard(members=[])`", lambda: SpikeGuard(members=[]), "members must name"),
    Case("constructor", "`guard.attach(trainer)` a second time", attached_twice, "attached already"),
    Case("constructor", "`wrapper.cancel_step(when=1.0)` in a `BEFORE_OPTIM_STEP` hook", cancel_when_a_float, "when must be"),
    Case("constructor", "`SchedulerHandler(optimizer)` (not a scheduler)", lambda: SchedulerHandler(plain_sgd()), "SGD"),
    Case("constructor", "`attach_checkpoint(trainer, to_save, 'ckpt', every=0)`", lambda: attach_checkpoint(a_trainer(), {}, "ckpt", every=0), "every"),
    Case("constructor", "`ResumableLoader(iter(loader))` (an iterator: cannot be replayed)", lambda: ResumableLoader(iter([1, 2])), "re-iterable"),
    Case("constructor", "`OptimWrapper(opt, clip_grad={'max_norm': -1})`", lambda: OptimWrapper(plain_sgd(), clip_grad={"max_norm": -1}), "max_norm"),
    Case("constructor", "`OptimWrapper(opt, clip_grad={'type': 'value', 'clip_value': -0.5})`", lambda: OptimWrapper(plain_sgd(), clip_grad={"type": "value", "clip_value": -0.5}), "clip_value"),
    Case("constructor", "`OptimWrapper(opt, clip_grad={'max_norm': 'big'})`", lambda: OptimWrapper(plain_sgd(), clip_grad={"max_norm": "big"}), "'big'"),
    Case("constructor", "`AmpOptimWrapper(optimizer=opt, loss_scale={'init_scale': 1e300})`", lambda: AmpOptimWrapper(optimizer=plain_sgd(), loss_scale={"init_scale": 1e300}), "init_scale"),
    Case("constructor", "`AmpOptimWrapper(optimizer=opt, loss_scale=1e-50)` (0 as a float32)", lambda: AmpOptimWrapper(optimizer=plain_sgd(), loss_scale=1e-50), "1e-50"),
    Case("constructor", "`OptimWrapperDict(gen=w, disc=w)` (one wrapper twice)", lambda: (lambda w: OptimWrapperDict(gen=w, disc=w))(OptimWrapper(plain_sgd())), "'gen' and 'disc'"),
    Case("constructor", "`OptimWrapperDict` whose members share a parameter", lambda: (lambda m: OptimWrapperDict(gen=OptimWrapper(plain_sgd(m)), disc=OptimWrapper(plain_sgd(m))))(make_model()), "both optimize one parameter"),
    Case("constructor", "`OptimWrapper(opt, clip_grad={'max_norm': 1, 'error_if_nonfinite': 'no'})`", lambda: OptimWrapper(plain_sgd(), clip_grad={"max_norm": 1, "error_if_nonfinite": "no"}), "error_if_nonfinite"),
    Case("constructor", "`AmpOptimWrapper(optimizer=opt, dtype='fp16')` over a `.half()` model", lambda: AmpOptimWrapper(optimizer=plain_sgd(make_model().half()), dtype="fp16"), "float16 parameters"),
    Case("constructor", "`OptimWrapper(SGD([{'params': ..., 'lr': float('inf')}], lr=0.1))`", lambda: OptimWrapper(torch.optim.SGD([{"params": make_model().parameters(), "lr": float("inf")}], lr=0.1)), "'lr'"),
    Case("constructor", "`ResumableLoader('abc')` (a string)", lambda: ResumableLoader("abc"), "re-iterable"),
    Case("constructor", "`attach_sharded_checkpoint(trainer, {'optim_wrapper': w}, 'ckpt')` (its model not saved)", a_sharded_checkpoint_of_a_wrapper_without_its_model, "no model there"),
    Case("constructor", "`attach_sharded_checkpoint(trainer, {'optim_wrapper': OptimWrapper(AdamWScheduleFree(...))}, 'ckpt')`", a_sharded_checkpoint_of_a_schedule_free_optimizer, "schedule-free"),
    Case("constructor", "`attach_sharded_checkpoint(trainer, to_save, 'ckpt', async_save='yes')`", lambda: attach_sharded_checkpoint(a_trainer(), {}, "ckpt", async_save="yes"), "async_save"),
    Case("config", "`build_optim_wrapper(model, {'type': 'FastWrapper', ...})`", lambda: build_optim_wrapper(make_model(), {"type": "FastWrapper", "optimizer": {"type": "SGD", "lr": 0.1}}), "FastWrapper"),
    Case("config", "`build_optim_wrapper(model, {'optimizer': {'type': 'Adamm'}})`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "Adamm", "lr": 0.1}}), "Adamm"),
    Case("config", "`build_optim_wrapper(model, {..., 'implementation': 'fast'})`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "implementation": "fast"}), "implementation"),
    Case("config", "`build_optim_wrapper(model, {..., 'clip_grad': {'max_norm': 1, 'fold_into_step': True}})` of an unfused SGD", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "clip_grad": {"max_norm": 1.0, "fold_into_step": True}}), "fold_into_step"),
    Case("config", "`build_optim_wrapper(model, {'optimizer': {'lr': 0.1}})` (no type)", lambda: build_optim_wrapper(make_model(), {"optimizer": {"lr": 0.1}}), "type"),
    Case("config", "`build_optim_wrapper(model, {'type': 'OptimWrapper'})` (no optimizer)", lambda: build_optim_wrapper(make_model(), {"type": "OptimWrapper"}), "optimizer"),
    Case("config", "`build_optim_wrapper(model, {'optimizer': {'type': 'SGD', 'lr': 0.1, 'momentom': 0.9}})`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1, "momentom": 0.9}}), "momentom"),
    Case("config", "`paramwise_cfg={'custom_keys': {'0.': {'lr_mult': -1}}}`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "paramwise_cfg": {"custom_keys": {"0.": {"lr_mult": -1}}}}), "lr_mult"),
    Case("config", "`paramwise_cfg={'bias_lr_mult': '0.1'}`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "paramwise_cfg": {"bias_lr_mult": "0.1"}}), "bias_lr_mult"),
    Case("config", "`paramwise_cfg={'custom_keys': {'0.': {'momentom': 0.9}}}`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "paramwise_cfg": {"custom_keys": {"0.": {"momentom": 0.9}}}}), "momentom"),
    Case("config", "`build_optim_wrapper(model, {'optimizer': {'type': 'SGD', 'lr': float('nan')}})`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": float("nan")}}), "'lr'"),
    Case("config", "`paramwise_cfg={'custom_keys': {'0.': {'lr': -1.0}}}`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "paramwise_cfg": {"custom_keys": {"0.": {"lr": -1.0}}}}), "'lr' must be >= 0"),
    Case("config", "`paramwise_cfg={'layer_decay_rate': 1.5}`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "SGD", "lr": 0.1}, "paramwise_cfg": {"layer_decay_rate": 1.5, "num_layers": 2}}), "(0, 1]"),
    Case("config", "`paramwise_cfg={'norm_decay_mult': 0}` for an optimizer without weight decay", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "Adafactor", "lr": 0.1, "weight_decay": None}, "paramwise_cfg": {"norm_decay_mult": 0.0}}), "no 'weight_decay'"),
    Case("config", "`{'optimizer': {'type': 'mypkg.optim.Lion'}}` (nothing to import)", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "mypkg.optim.Lion"}}), "dotted import path"),
    Case("config", "`{'optimizer': {'type': 'ZeroRedundancyOptimizer', 'lr': 0.1}}` (no optimizer_type)", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "ZeroRedundancyOptimizer", "lr": 0.1}}), "optimizer_type"),
    Case("trainer", "`create_trainer(model, optimizer, loss_fn)` (optimizer not wrapped)", lambda: create_trainer(make_model(), plain_sgd(), F.mse_loss), "OptimWrapper"),
    Case("trainer", "`create_trainer(model, OptimWrapper(SGD(other_model.parameters())), loss_fn)`", lambda: create_trainer(make_model(), OptimWrapper(plain_sgd()), F.mse_loss), "updates none of the model's parameters"),
    Case("trainer", "`wrapper.update_params(loss)` of an LBFGS wrapper (no closure)", lambda: lbfgs_update(lbfgs_wrapper()), "closure"),
    Case("trainer", "`update_params(loss, closure=3)`", lambda: lbfgs_update(lbfgs_wrapper(), closure=3), "closure must be callable"),
    Case("constructor", "`OptimWrapper(LBFGS(params), accumulative_counts=2)`", lambda: lbfgs_wrapper(accumulative_counts=2), "accumulative_counts=2"),
    Case("constructor", "`AmpOptimWrapper(optimizer=LBFGS(params), dtype='float16')`", lambda: AmpOptimWrapper(optimizer=torch.optim.LBFGS(make_model().parameters()), dtype="float16"), "float16"),
    Case("trainer", "`update_params(loss, closure=f)` of an SGD wrapper with `accumulative_counts=2`", lambda: OptimWrapper(plain_sgd(), accumulative_counts=2).update_params(make_model()(torch.ones(2, 4)).sum(), closure=lambda: None), "accumulative_counts=2"),
    Case("constructor", "`OptimWrapper(SGD(params), sam=dict(rho=0))`", lambda: OptimWrapper(plain_sgd(), sam={"rho": 0}), "sam['rho']"),
    Case("constructor", "`OptimWrapper(SGD(params), sam=dict(rho=0.05), accumulative_counts=4)`", lambda: OptimWrapper(plain_sgd(), sam={"rho": 0.05}, accumulative_counts=4), "accumulative_counts=4"),
    Case("constructor", "`OptimWrapper(LBFGS(params), sam=dict(rho=0.05))`", lambda: OptimWrapper(torch.optim.LBFGS(make_model().parameters()), sam={"rho": 0.05}), "LBFGS takes its own closure"),
    Case("constructor", "`build_optim_wrapper(model, dict(optimizer=..., routes=dict(muon=dict(names=['nothing'], optimizer=dict(type='Muon')))))`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "AdamW"}, "routes": {"muon": {"names": ["nothing"], "optimizer": {"type": "Muon"}}}}), "takes no parameter"),
    Case("constructor", "`routes=dict(muon=dict(optimizer=dict(type='Muon')))`: every parameter, biases too", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "AdamW"}, "routes": {"muon": {"optimizer": {"type": "Muon"}}}}), "Muon only supports 2D"),
    Case("constructor", "`routes=dict(muon=dict(names=['0.'], ...))`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "AdamW"}, "routes": {"muon": {"names": ["0."], "optimizer": {"type": "Muon"}}}}), "no name pattern"),
    Case("constructor", "`routes=dict(default=dict(...))`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "AdamW"}, "routes": {"default": {"ndim": 2, "optimizer": {"type": "Muon"}}}}), "not 'default'"),
    Case("trainer", "a SAM `AmpOptimWrapper` of float16 given a closure that runs backward itself", lambda: sam_fp16_torch_style_closure(), "return the loss without calling backward"),
    Case("constructor", "`RoutedOptimizer(...).add_param_group(group)`", lambda: build_optim_wrapper(make_model(), {"optimizer": {"type": "AdamW"}, "routes": {"muon": {"ndim": 2, "optimizer": {"type": "Muon"}}}}).optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, 2))]}), "add the group to the member"),
    Case("trainer", "`update_params(loss)` of a SAM wrapper (no second pass)", lambda: OptimWrapper(plain_sgd(), sam={}).update_params(make_model()(torch.ones(2, 4)).sum()), "closure"),
    Case("trainer", "`create_trainer(model, OptimWrapper(LBFGS(...)), loss_fn, num_items=n)`", lambda: create_trainer(make_model(), lbfgs_wrapper(), F.mse_loss, num_items=lambda x, y: 2), "num_items"),
    Case("trainer", "`create_trainer(model, wrapper)` (no loss_fn, no train_step)", lambda: create_trainer(make_model(), OptimWrapper(plain_sgd()), None), "loss_fn"),
    Case("trainer", "`create_trainer(model, wrapper_dict, loss_fn)`", lambda: create_trainer(make_model(), OptimWrapperDict(gen=OptimWrapper(plain_sgd())), F.mse_loss), "train_step"),
    Case("trainer", "`create_trainer(model, wrapper, lambda y_pred: ...)` (wrong arity)", lambda: create_trainer(make_model(), OptimWrapper(plain_sgd()), lambda y_pred: y_pred.sum()), "loss_fn"),
    Case("trainer", "`create_trainer(model, wrapper, loss_fn, device=3.5)`", lambda: create_trainer(make_model(), OptimWrapper(plain_sgd()), F.mse_loss, device=3.5), "device"),
    Case("trainer", "`create_trainer(model, wrapper, loss_fn, device='gpu')`", lambda: create_trainer(make_model(), OptimWrapper(plain_sgd()), F.mse_loss, device="gpu"), "'gpu'"),
    Case("trainer", "`wrapper.update_params(loss.item())` (a float)", lambda: OptimWrapper(plain_sgd()).update_params(0.5), "loss must be a tensor"),
    Case("trainer", "`wrapper.update_params(loss)` of a loss made under `no_grad`", a_loss_under_no_grad, "does not require grad"),
    Case("trainer", "`wrapper.update_params(loss)` of a loss that is not a scalar", lambda: (lambda m: OptimWrapper(plain_sgd(m)).update_params(m(torch.ones(2, 4))))(make_model()), "scalar"),
    Case("trainer", "`create_trainer(model, wrapper, train_step=step, model_fn=f)` (model_fn never reached)", lambda: create_trainer(make_model(), OptimWrapper(plain_sgd()), train_step=lambda engine, batch: None, model_fn=lambda model, x: model(x)), "model_fn"),
    Case("trainer", "`member_filter('gen', every=0)`", lambda: member_filter("gen", every=0), "every"),
    Case("trainer", "`create_trainer(model, wrapper, loss_fn, device='mps')` without MPS", lambda: create_trainer(make_model(), OptimWrapper(plain_sgd()), F.mse_loss, device="mps"), "'mps'"),
    Case("trainer", "`attach_checkpoint(None, to_save, 'ckpt')` (no trainer)", lambda: attach_checkpoint(None, {}, "ckpt"), "trainer must be"),
    Case("trainer", "`attach_sharded_checkpoint(trainer, {'step': 5}, 'ckpt')` (no state_dict)", lambda: attach_sharded_checkpoint(a_trainer(), {"step": 5}, "ckpt"), "to_save['step']"),
    Case("checkpoint file", "`load_checkpoint(to_load, 5)` (a number as the path)", lambda: load_checkpoint({"model": make_model()}, 5), "path must be"),
    Case("trainer", "`attach_checkpoint(trainer, to_save, None)`", lambda: attach_checkpoint(a_trainer(), {}, None), "dirname"),
    Case("data", "a batch that is one tensor of 3 rows, not `(x, y)`", lambda: run_trainer(make_model(), F.mse_loss, torch.ones(3, 4)), "(x, y)"),
    Case("data", "`x` with 3 features for a model taking 4", lambda: run_trainer(make_model(), F.mse_loss, (torch.ones(2, 3), torch.ones(2, 2))), "float32 tensor (2, 3)"),
    Case("data", "float targets for `cross_entropy` over 2 classes, wrong shape", lambda: run_trainer(make_model(), F.cross_entropy, (torch.ones(2, 4), torch.ones(2, 3))), "y = float32 tensor (2, 3)"),
    Case("data", "a loss that is not a scalar (`loss_fn=lambda p, y: p - y`)", lambda: run_trainer(make_model(), lambda p, y: p - y, (torch.ones(2, 4), torch.ones(2, 2))), "scalar"),
    Case("state dict", "`wrapper.load_state_dict({'lr': 0.1})`", lambda: OptimWrapper(plain_sgd()).load_state_dict({"lr": 0.1}), "param_groups"),
    Case("state dict", "a wrapper state dict with two param groups into one", lambda: OptimWrapper(plain_sgd()).load_state_dict( OptimWrapper( torch.optim.SGD( [ {"params": [torch.zeros(1, requires_grad=True)]}, {"params": [torch.zeros(1, requires_grad=True)]}, ], lr=0.1, ) ).state_dict() ), "2 param group"),
    Case("state dict", "an AdamW state of a model with other shapes (same parameter count)", other_model_optimizer_state, "exp_avg"),
    Case("state dict", "`counters` holding a string", lambda: OptimWrapper(plain_sgd()).load_state_dict({**plain_sgd().state_dict(), "counters": {"steps": "7"}}), "'steps'"),
    Case("state dict", "a plain AdamW optimizer's state into an SGD wrapper", adamw_state_into_sgd, "momentum"),
    Case("state dict", "a member of an `OptimWrapperDict` whose lr is nan (the other members stay as they were)", a_bad_member_of_a_wrapper_dict, "'lr'"),
    Case("state dict", "`counters` with more skipped steps than steps", lambda: OptimWrapper(plain_sgd()).load_state_dict({**plain_sgd().state_dict(), "counters": {"steps": 2, "skipped_steps": 5}}), "skipped steps"),
    Case("state dict", "a state saved mid-window with `accumulative_counts=4` into a wrapper of 2", a_mid_window_state_into_another_accumulation, "accumulative_counts=4"),
    Case("state dict", "a data position after batch 5 of data of 3 batches", a_data_position_past_the_datas_end, "only 3 batches"),
    Case("state dict", "a data position saved mid-pass by 2 processes, into 1 without a `DistributedSampler`", a_mid_pass_position_of_two_processes_into_one, "mid-pass"),
    Case("state dict", "a data position of 2 processes over 9 samples (10 a pass, padded), into 1 (9 a pass)", a_data_state_of_two_processes_into_one_that_pads_otherwise, "gives 10 a pass on 2"),
    Case("state dict", "a window begun with `num_items` by 2 processes, into 1", a_num_items_window_of_two_processes_into_one, "num_items by a run of 2"),
    Case("state dict", "`ResumableLoader.load_state_dict({'position': -1, ...})`", lambda: ResumableLoader([1]).load_state_dict( {"position": -1, "epoch_rng": None, "rng": {"torch": torch.get_rng_state()}} ), "position"),
    Case("checkpoint file", "a checkpoint truncated to half its size", lambda: load_into_fresh(truncated("ckpt/checkpoint_3.pt")), "ckpt/checkpoint_3.pt"),
    Case("checkpoint file", "a checkpoint with 4 bytes flipped in a tensor's data", lambda: load_into_fresh(flipped_tensor_bytes("ckpt/checkpoint_3.pt")), "CRC"),
    Case("checkpoint file", "a checkpoint with 64 bytes flipped in its middle", lambda: load_into_fresh(corrupted("ckpt/checkpoint_3.pt")), "ckpt/checkpoint_3.pt"),
    Case("checkpoint file", "a text file named `checkpoint_3.pt`", lambda: load_into_fresh(file_with("ckpt/checkpoint_3.pt", b"step: 3\n")), "ckpt/checkpoint_3.pt"),
    Case("checkpoint file", "a pickle that would run a shell command when loaded", lambda: load_into_fresh(pickled_code("ckpt/checkpoint_3.pt")), "could run code"),
    Case("checkpoint file", "a file holding a tensor, not a dict", lambda: load_into_fresh(file_with("ckpt/checkpoint_3.pt", _saved_bytes(torch.ones(3)))), "checkpoint dict"),
    Case("checkpoint file", "a checkpoint of a model with other layer sizes", lambda: ( saved_run("ckpt/checkpoint_3.pt"), load_into_fresh( "ckpt/checkpoint_3.pt", torch.nn.Sequential( torch.nn.Linear(4, 9), torch.nn.LayerNorm(9), torch.nn.ReLU(), torch.nn.Linear(9, 2) ), ), ), "shapes differ"),
    Case("checkpoint file", "a checkpoint without the `data` entry being resumed", lambda: ( saved_run("ckpt/checkpoint_3.pt"), load_into_fresh("ckpt/checkpoint_3.pt", extra={"data": ResumableLoader([1])}), ), "lacks ['data']"),
    Case("checkpoint file", "`attach_checkpoint` of a new run to a directory holding `checkpoint_8.pt`", new_run_behind_the_checkpoints_there, "checkpoint_8.pt"),
    Case("checkpoint file", "`attach_checkpoint` to a directory holding a directory `checkpoint_1.pt`", a_directory_named_like_a_checkpoint_there, "checkpoint_1.pt (a directory)"),
    Case("state dict", "an `AdamW` wrapper's state into an `Adam` wrapper", an_adamw_state_into_an_adam_wrapper, "AdamW"),
    Case("checkpoint file", "torch's `GradScaler` beside the model, saved disabled, loaded into an enabled one", a_disabled_scalers_state_into_an_enabled_one, "'scaler'"),
    Case("checkpoint file", "a checkpoint whose grad scaler scale is nan", lambda: a_nan_loss_scale("ckpt/checkpoint_4.pt"), "scale"),
    Case("checkpoint file", "a checkpoint whose trainer is at iteration -1", lambda: load_full_run(checkpoint_with("ckpt/checkpoint_5.pt", trainer=lambda state: {**state, "iteration": -1})), "'iteration'"),
    Case("checkpoint file", "a checkpoint whose scheduler entry is the number 5", lambda: scheduler_entry_of_a_number("ckpt/checkpoint_6.pt"), "'scheduler'"),
    Case("checkpoint file", "a checkpoint whose model is in float64, for a float32 model", a_float64_model_checkpoint, "dtypes differ"),
    Case("state dict", "a data position whose generator state lacks Python's", lambda: ResumableLoader([1]).load_state_dict({"position": 0, "epoch_rng": None, "rng": {"torch": torch.get_rng_state()}}), "lacks ['python']"),
    Case("checkpoint file", "a run into a checkpoint directory another process holds", a_directory_another_run_holds, "in use by another run"),
    Case("checkpoint file", "a checkpoint directory under a file", a_checkpoint_directory_under_a_file, "cannot write checkpoints to plain.txt/checkpoints"),
    Case("checkpoint file", "a `StepLR` state into a `LambdaLR` (the model is not loaded either)", lambda: another_schedulers_state("ckpt/checkpoint_7.pt"), "lr_lambdas"),
    Case("checkpoint file", "`resume_from_latest(to_load, 'ckpt/checkpoint_3.pt')` (a file, not its directory)", lambda: (saved_run("ckpt/checkpoint_3.pt"), resume_from_latest({"model": make_model()}, "ckpt/checkpoint_3.pt")), "is a file"),
    Case("checkpoint file", "a sharded checkpoint of a model with other layer sizes", a_sharded_checkpoint_of_other_layer_sizes, "shapes differ"),
    Case("checkpoint file", "a sharded checkpoint directory without DCP's `.metadata`", a_sharded_checkpoint_without_its_metadata, "not a complete sharded checkpoint"),
    Case("checkpoint file", "a sharded checkpoint whose `.metadata` would run a shell command when read", a_sharded_checkpoint_whose_metadata_runs_code, "could run code"),
    Case("checkpoint file", "a sharded checkpoint with one bit flipped in a shard", a_sharded_checkpoint_with_a_bit_flipped_in_a_shard, "__0_0.distcp is damaged"),
    Case("checkpoint file", "`latest_checkpoint('ckpt', kind='files')`", lambda: latest_checkpoint("ckpt", kind="files"), "kind must be one of"),
    Case("checkpoint file", "a path that does not exist", lambda: load_into_fresh("ckpt/checkpoint_9.pt"), "ckpt/checkpoint_9.pt"),
    Case("command", "`engine-opt train --epochs 0`", lambda: command("--epochs", "0"), "--epochs"),
    Case("command", "`engine-opt train --dtype fp16 --wrapper OptimWrapper`", lambda: command("--dtype", "fp16", "--wrapper", "OptimWrapper"), "--dtype fp16"),
    Case("command", "`engine-opt train --optimizer Adamm`", lambda: command("--optimizer", "Adamm"), "Adamm"),
    Case("command", "`engine-opt train --spike-guard undo`", lambda: command("--spike-guard", "undo"), "--spike-guard"),
    Case("command", "`engine-opt train --config missing.json`", lambda: command("--config", "missing.json"), "missing.json"),
    Case("command", "`engine-opt train --config bad.json` (not JSON)", lambda: (file_with("bad.json", b"{type: SGD"), command("--config", "bad.json")), "bad.json"),
    Case("command", "`engine-opt train --config list.json` (a JSON list)", lambda: (file_with("list.json", b"[1, 2]"), command("--config", "list.json")), "list.json"),
    Case("command", "`engine-opt train --config c.json --lr 0.1`", lambda: (file_with("c.json", b"{}"), command("--config", "c.json", "--lr", "0.1")), "--lr"),
    Case("command", "`engine-opt train` into a directory holding another run's checkpoints", with_checkpoints_of_another_run, "--resume"),
    Case("command", "`engine-opt train --resume --task gan` on a classifier's checkpoints", resume_with_other_options, "--resume"),
    Case("command", "`engine-opt train --resume` of a run that is complete", resume_a_complete_run, "--epochs above 1"),
    Case("command", "`engine-opt train --resume --batch-size 32` on a run of 64", resume_with_another_batch_size, "--batch-size 32"),
    Case("command", "`engine-opt train --resume --epochs 2` of a 1-epoch cosine run", extend_a_cosine_run, "cosine"),
    Case("command", "`engine-opt train --optimizer SparseAdam`", lambda: command("--log-dir", "runs/sparse", "--optimizer", "SparseAdam"), "SparseAdam"),
    Case("command", "`engine-opt train --task gan --optimizer LBFGS`", lambda: command("--log-dir", "runs/lbfgs", "--task", "gan", "--optimizer", "LBFGS"), "LBFGS"),
    Case("command", "`engine-opt train --sam 0.05 --task gan`", lambda: command("--log-dir", "runs/sam", "--task", "gan", "--sam", "0.05"), "sam"),
    Case("command", "`engine-opt train --optimizer LBFGS --accumulate 2`", lambda: command("--log-dir", "runs/lbfgs2", "--optimizer", "LBFGS", "--accumulate", "2"), "accumulative_counts=2"),
    Case("command", "`engine-opt train --lr inf`", lambda: command("--log-dir", "runs/inf", "--lr", "inf"), "--lr"),
    Case("command", "`engine-opt train --device cuda` without a GPU", lambda: command("--device", "cuda"), "--device cuda"),
    Case("command", "`engine-opt train --resume --checkpoint-dir elsewhere` into an earlier run's logs, no checkpoint there", resume_from_nowhere_over_earlier_logs, "--checkpoint-dir"),
    Case("command", "`engine-opt train --resume` whose newest checkpoint has a flipped bit", resume_from_a_damaged_newest, "checkpoint_32.pt is the newest that reads whole"),
    Case("command", "`engine-opt train` into a checkpoint directory holding a directory `checkpoint_64.pt`", a_command_into_a_directory_named_like_a_checkpoint, "checkpoint_64.pt (a directory)"),
    Case("command", "`engine-opt train` into a checkpoint directory another run holds", a_command_into_a_directory_another_run_holds, "in use by another run"),
    Case("command", "`engine-opt train --config run.py` whose file sets MMEngine's `work_dir`", lambda: (file_with("run.py", RUN_CONFIG + b"work_dir = 'out'"), command("--log-dir", "runs/py1", "--config", "run.py")), "work_dir"),
    Case("command", "`engine-opt train --config run.py` whose file defines no `train_dataloader`", lambda: (file_with("run2.py", b"import torch\nmodel = torch.nn.Linear(4, 2)"), command("--log-dir", "runs/py2", "--config", "run2.py")), "train_dataloader"),
    Case("command", "`engine-opt train --config run.py` whose loader asks for another sampler", lambda: (file_with("run3.py", RUN_CONFIG + b"train_dataloader['sampler'] = dict(type='InfiniteSampler')"), command("--log-dir", "runs/py3", "--config", "run3.py")), "sampler"),
    Case("command", "`engine-opt train --config run.py --task gan`", lambda: (file_with("run4.py", RUN_CONFIG), command("--log-dir", "runs/py4", "--config", "run4.py", "--task", "gan")), "--task gan"),
    Case("command", "`engine-opt train --nproc-per-node 3 --batch-size 64`", lambda: command("--nproc-per-node", "3", "--batch-size", "64"), "--batch-size 64"),
    Case("command", "`engine-opt train --nproc-per-node 2 --backend nccl` without GPUs", lambda: command("--nproc-per-node", "2", "--backend", "nccl"), "--backend nccl"),
]
# fmt: on


def _saved_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def outcome(case: Case) -> str:
    """What the user gets, as the table shows it: the exception and its message (and note), or the exit."""
    try:
        case.action()
    except SystemExit as error:
        return str(error)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        notes = getattr(error, "__notes__", [])
        return f"{type(error).__name__}: {message}" + "".join(f" [note: {note}]" for note in notes)
    raise AssertionError(f"{case.given}: nothing was raised")


def render(outcomes: list[str]) -> str:
    def cell(text: str) -> str:
        text = re.sub(r" at 0x[0-9a-f]+", "", text)  # object addresses change from run to run
        return text.replace("|", "\\|").replace("\n", " ")

    def plain(text: str) -> str:  # the message as text: no bracket may start a Markdown link
        return cell(text).replace("[", "\\[")

    rows = ["| | Given | What the user gets |", "|---|---|---|"]
    rows += [f"| {case.area} | {cell(case.given)} | {plain(got)} |" for case, got in zip(CASES, outcomes, strict=True)]
    return "\n".join(rows)


class Outcomes:
    """Each case's outcome, got on first use (in the order asked), all in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.got: dict[int, str] = {}

    def __getitem__(self, index: int) -> str:
        if index not in self.got:
            cwd = os.getcwd()
            os.chdir(self.directory)  # relative paths: the messages do not depend on where the tests run
            try:
                self.got[index] = outcome(CASES[index])
            finally:
                os.chdir(cwd)
        return self.got[index]


def all_outcomes(directory: Path) -> list[str]:
    outcomes = Outcomes(directory)
    return [outcomes[index] for index in range(len(CASES))]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the table records a machine without a GPU (the --device cuda and nccl rows)")
    return Outcomes(tmp_path_factory.mktemp("hostile"))


def case_param(index: int) -> Any:
    """The command's cases run ``engine-opt train`` in-process: slow."""
    marks = [pytest.mark.slow] if CASES[index].area == "command" else []
    return pytest.param(index, marks=marks, id=f"{CASES[index].area}: {CASES[index].given}")


@pytest.mark.parametrize("index", [case_param(index) for index in range(len(CASES))])
def test_each_bad_input_gets_a_clear_error_naming_what_was_wrong(outcomes, index):
    got, case = outcomes[index], CASES[index]
    clear = ("ValueError", "TypeError", "KeyError", "exit 2: ", "RuntimeError", "OSError", "RunDirectoryBusy")
    assert got.startswith((*clear, "RunDirectoryConflict", "DamagedCheckpoint")), got  # the last two: ValueErrors
    if got.startswith("RuntimeError"):  # torch's own error, kept, with the note saying which batch it came from
        assert "[note: engine_opt: iteration" in got, got
    assert case.names in got, f"{case.given}: {got!r} does not mention {case.names!r}"


def without_torch_words(table: str) -> list[str]:
    rows = table.splitlines()
    for pattern, replacement in TORCH_WORDS:
        rows = [pattern.sub(replacement, row) for row in rows]
    return rows


@pytest.mark.slow  # every row, the command's included
def test_the_docs_table_shows_what_users_get(outcomes):
    text = DOC.read_text()
    table = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)].strip()
    stale = "docs/hostile-input.md is stale: run `python tests/test_hostile_input.py`"
    got = [outcomes[index] for index in range(len(CASES))]
    assert without_torch_words(table) == without_torch_words(render(got)), stale


def test_torch_words_are_masked_and_nothing_else():
    row = "| data | x | RuntimeError: mat1 and mat2 shapes cannot be multiplied \\[note: engine_opt: iteration 1 failed] |"
    assert without_torch_words(row) == [
        "| data | x | RuntimeError: (torch's message) \\[note: engine_opt: iteration 1 failed] |"
    ]
    ours = "| data | x | ValueError: the default prepare_batch expects batches of (x, y) |"
    assert without_torch_words(ours) == [ours]


if __name__ == "__main__":  # rewrite the table of docs/hostile-input.md
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        table = render(all_outcomes(Path(directory)))
    text = DOC.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(f"rewrote the table of {DOC} ({len(CASES)} rows)", file=sys.stderr)
