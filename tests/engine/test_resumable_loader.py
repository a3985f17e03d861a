"""ResumableLoader and the generators' state: a resumed pass gives the uninterrupted pass's batches and numbers."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from engine_opt.engine import ResumableLoader, rng_state, set_rng_state
from engine_opt.optim import distributed


def shuffled(generator=None):
    return DataLoader(torch.arange(12), batch_size=3, shuffle=True, generator=generator)  # 4 full batches


@pytest.mark.parametrize("own_generator", [False, True])
@pytest.mark.parametrize("stop_after", [0, 1, 3, 4])
def test_the_data_continues_where_it_stopped(stop_after, own_generator):
    def make():
        return shuffled(torch.Generator().manual_seed(3) if own_generator else None)

    torch.manual_seed(0)
    loader = ResumableLoader(make())
    expected = [[batch.tolist() for batch in loader] for _ in range(2)]

    torch.manual_seed(0)
    loader = ResumableLoader(make())
    batches = iter(loader)
    seen = [next(batches).tolist() for _ in range(stop_after)]
    state = loader.state_dict()
    torch.manual_seed(123)  # a new process
    resumed = ResumableLoader(make())
    resumed.load_state_dict(state)
    resumed_batches = [batch.tolist() for batch in resumed]
    if stop_after < len(loader):
        assert seen + resumed_batches == expected[0]
        assert [batch.tolist() for batch in resumed] == expected[1]
    else:  # the pass was over: the next one starts
        assert (seen, resumed_batches) == (expected[0], expected[1])


def test_a_loader_generator_is_saved_too():
    loader = ResumableLoader(shuffled(torch.Generator().manual_seed(3)))
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    rest = [batch.tolist() for batch in batches]
    resumed = ResumableLoader(shuffled(torch.Generator().manual_seed(99)))
    resumed.load_state_dict(state)
    assert [batch.tolist() for batch in resumed] == rest


def seeded_by_its_sampler(seed=5, batch_sampler=False):
    """A DataLoader whose order comes from its sampler's own generator, as a new process builds it."""
    sampler = RandomSampler(range(12), generator=torch.Generator().manual_seed(seed))
    if batch_sampler:
        return DataLoader(torch.arange(12), batch_sampler=BatchSampler(sampler, batch_size=3, drop_last=False))
    return DataLoader(torch.arange(12), batch_size=3, sampler=sampler)


@pytest.mark.parametrize("batch_sampler", [False, True], ids=["sampler", "batch sampler"])
@pytest.mark.parametrize("stop", [(0, 2), (2, 1), (2, 3)], ids=lambda stop: f"pass {stop[0]} batch {stop[1]}")
def test_a_samplers_own_generator_is_saved_so_a_new_process_continues_the_same_order(stop, batch_sampler):
    passes, batch = stop
    uninterrupted = ResumableLoader(seeded_by_its_sampler(batch_sampler=batch_sampler))
    expected = [batch.tolist() for _ in range(passes + 2) for batch in uninterrupted]
    loader = ResumableLoader(seeded_by_its_sampler(batch_sampler=batch_sampler))
    seen = [batch.tolist() for _ in range(passes) for batch in loader]
    batches = iter(loader)
    seen += [next(batches).tolist() for _ in range(batch)]
    state = loader.state_dict()
    resumed = ResumableLoader(seeded_by_its_sampler(batch_sampler=batch_sampler))  # its generator anew, at seed 5
    resumed.load_state_dict(state)
    rest = [batch.tolist() for _ in range(2) for batch in resumed]
    assert seen + rest == expected
    one_pass = [sample for batch in expected[4 * passes : 4 * passes + 4] for sample in batch]
    assert sorted(one_pass) == list(range(12))  # each sample once a pass


def test_a_state_of_other_data_generators_is_refused_by_name():
    state = ResumableLoader(seeded_by_its_sampler()).state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['rng'\] holds the states of 1 data generator\(s\), this loader"):
        ResumableLoader(shuffled()).load_state_dict(state)


def test_rng_state_round_trip_covers_python_and_numpy():
    numpy = pytest.importorskip("numpy")
    state = rng_state()
    expected = (torch.rand(2), random.random(), numpy.random.rand())
    set_rng_state(state)
    assert (torch.rand(2).tolist(), random.random(), numpy.random.rand()) == (expected[0].tolist(), *expected[1:])


def test_bad_loader_input():
    with pytest.raises(TypeError, match="re-iterable collection of batches"):
        ResumableLoader(iter([1, 2]))
    loader = ResumableLoader([1, 2])
    with pytest.raises(ValueError, match=r"state_dict lacks \['epoch_rng', 'rng'\]"):
        loader.load_state_dict({"position": 1})
    with pytest.raises(ValueError, match=r"state_dict\['position'\] must be an int >= 0, got -1"):
        loader.load_state_dict({"position": -1, "epoch_rng": None, "rng": rng_state()})
    with pytest.raises(ValueError, match=r"state_dict\['rng'\] must be what rng_state\(\) returned"):
        loader.load_state_dict({"position": 0, "epoch_rng": None, "rng": 5})
    assert list(loader) == [1, 2]  # nothing pending after failed loads
    state = ResumableLoader([1, 2, 3, 4]).state_dict() | {"position": 3, "epoch_rng": rng_state()}
    with pytest.raises(ValueError, match="after batch 3 of a pass, but the data gives only 2 batches"):
        loader.load_state_dict(state)  # refused at the load, before any other object of a checkpoint loads
    assert list(loader) == [1, 2]


def test_checking_a_state_changes_nothing():
    loader = ResumableLoader(shuffled())
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    before = copy.deepcopy(state)
    loader.check_state_dict(state)
    assert loader.state_dict()["position"] == 1 and state["position"] == before["position"]
    with pytest.raises(ValueError, match=r"state_dict\['passes'\] must be an int >= 0"):
        loader.check_state_dict({**state, "passes": -2})
    assert [batch.tolist() for batch in batches] and loader.state_dict()["position"] == 4


def distributed_loader(processes, rank, seed=0, samples=24, global_batch=6):
    sampler = DistributedSampler(torch.arange(samples), num_replicas=processes, rank=rank, shuffle=True, seed=seed)
    return ResumableLoader(DataLoader(torch.arange(samples), batch_size=global_batch // processes, sampler=sampler))


def state_of_two_ranks(position, make=distributed_loader):
    """What a checkpoint of 2 processes holds after ``position`` batches of the first pass (each rank's streams)."""
    loaders = [make(2, rank) for rank in (0, 1)]
    seen = []
    for loader in loaders:
        batches = iter(loader)
        seen.append([next(batches).tolist() for _ in range(position)])
    states = [loader.state_dict() for loader in loaders]
    return {**states[0], "ranks": [{"epoch_rng": s["epoch_rng"], "rng": s["rng"]} for s in states]}, seen


@pytest.mark.parametrize("position", [1, 2, 3])
def test_a_state_of_two_processes_continues_in_one_with_each_sample_once(position):
    state, seen = state_of_two_ranks(position)
    resumed = distributed_loader(1, 0)
    resumed.load_state_dict(state)
    rest = [batch.tolist() for batch in resumed]
    assert len(rest) == 4 - position
    # the global batches of one process are those of two, rank 0's half and rank 1's together
    halves = [[batch.tolist() for batch in distributed_loader(2, rank)] for rank in (0, 1)]
    uninterrupted = [sorted(a + b) for a, b in zip(*halves, strict=True)]
    assert [sorted(batch) for batch in rest] == uninterrupted[position:]
    before = [sample for rank in seen for batch in rank for sample in batch]
    assert sorted([*before, *(sample for batch in rest for sample in batch)]) == list(range(24))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda processes, rank: ResumableLoader(shuffled()), "saved None, this run None"),  # a RandomSampler's order
        (lambda processes, rank: distributed_loader(processes, rank, seed=processes), "'seed': 2"),
    ],
)
def test_a_mid_pass_state_of_another_process_count_is_refused_unless_the_order_is_the_samplers(make, message):
    state, _ = state_of_two_ranks(2, make)
    resumed = make(1, 0)
    with pytest.raises(ValueError, match=f"saved mid-pass \\(after batch 2\\) by a run of 2 process.*{message}"):
        resumed.load_state_dict(state)
    assert resumed.state_dict()["position"] == 0  # nothing taken


def test_a_state_of_another_process_count_between_passes_is_accepted_whatever_the_sampler():
    state, _ = state_of_two_ranks(4, lambda processes, rank: ResumableLoader(shuffled()))
    resumed = ResumableLoader(shuffled())
    resumed.load_state_dict(state)
    assert len([batch for batch in resumed]) == 4  # the next pass, whole
    assert resumed.state_dict()["passes"] == 2


@pytest.mark.parametrize(("saved_batch", "batch"), [(3, 12), (6, 3)])  # passes of 4 batches into 2, 2 into 8
def test_a_pass_ended_by_another_process_count_is_followed_by_a_whole_pass_whatever_its_length(saved_batch, batch):
    def make(processes, rank, batch_size=saved_batch):
        sampler = DistributedSampler(torch.arange(24), num_replicas=processes, rank=rank, shuffle=True, seed=0)
        return ResumableLoader(DataLoader(torch.arange(24), batch_size=batch_size, sampler=sampler))

    state, _ = state_of_two_ranks(24 // 2 // saved_batch, make)  # each rank at the end of its first pass
    resumed = make(1, 0, batch)
    resumed.load_state_dict(state)
    second_pass = [sample for batch in resumed for sample in batch.tolist()]
    sampler = DistributedSampler(torch.arange(24), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(1)
    assert second_pass == list(sampler)  # the next epoch's order, whole
    assert resumed.state_dict()["passes"] == 2


@pytest.mark.parametrize("position", [2, 4])
def test_a_state_of_another_process_count_from_an_earlier_release_is_refused_unless_at_a_passes_start(position):
    state, _ = state_of_two_ranks(position)
    older = {key: value for key, value in state.items() if key not in ("length", "order")}
    with pytest.raises(
        ValueError, match=f"by an earlier release.*whether its batch {position} ended the pass is unknown"
    ):
        distributed_loader(1, 0).load_state_dict(older)
    fresh, _ = state_of_two_ranks(0)
    distributed_loader(1, 0).load_state_dict({key: value for key, value in fresh.items() if key != "length"})


def test_a_state_resumes_on_another_process_count_only_where_the_sampler_pads_alike(monkeypatch):
    """242 samples, 2 -> 1 -> 3 processes: 2 -> 1 is exact; on 3 a DistributedSampler pads to 243 (one sample
    seen twice a pass, where the interrupted run saw each once), so that resume is refused, naming the counts
    that keep 242."""
    samples, global_batch = 242, 66

    def make(processes, rank):
        return distributed_loader(processes, rank, samples=samples, global_batch=global_batch)

    state, seen = state_of_two_ranks(2, make)
    resumed = make(1, 0)
    resumed.load_state_dict(state)
    batches = iter(resumed)
    third = next(batches).tolist()
    oracle = DistributedSampler(torch.arange(samples), num_replicas=1, rank=0, shuffle=True, seed=0)
    one_process = list(oracle)  # the one-process run's pass: its third global batch is the 2-process run's
    assert sorted(third) == sorted(one_process[2 * global_batch : 3 * global_batch])
    before = sorted(sample for rank in seen for batch in rank for sample in batch)
    assert before == sorted(one_process[: 2 * global_batch])
    mid_pass, between_passes = resumed.state_dict(), make(1, 0).state_dict()
    for saved in (mid_pass, between_passes):
        refused = make(3, 0)
        with (
            monkeypatch.context() as patch,
            pytest.raises(
                ValueError,
                match=r"saved by a run of 1 process\(es\), this run has 3: a DistributedSampler over 242 samples "
                r"gives 242 a pass on 1 and 243 on 3 .* processes that gives 242: 1, 2, 11, 22, 121, 242$",
            ),
        ):
            patch.setattr(distributed, "world_size", lambda: 3)
            refused.load_state_dict(saved)
        assert refused.state_dict()["position"] == 0  # nothing taken
    monkeypatch.setattr(distributed, "world_size", lambda: 11)
    make(11, 0).load_state_dict(between_passes)  # 242 on 11 processes too: accepted
