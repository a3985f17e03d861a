"""Optimizers with train and eval modes: found (a ZeRO's inner one too), their mode read, switched and put back."""

from __future__ import annotations

import torch

from engine_opt.optim.modes import eval_mode, has_modes, in_train_mode


class ModalSGD(torch.optim.SGD):
    """An optimizer keeping its mode as an attribute (as pytorch-optimizer's schedule-free wrapper does)."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.train_mode = False
        self.calls = []

    def train(self):
        self.calls.append("train")
        self.train_mode = True

    def eval(self):
        self.calls.append("eval")
        self.train_mode = False


def test_a_mode_kept_as_an_attribute_is_read_and_put_back_as_it_was():
    optimizer = ModalSGD([torch.nn.Parameter(torch.ones(1))])
    assert has_modes(optimizer) and not in_train_mode(optimizer)
    with eval_mode([optimizer]):  # in eval mode already: nothing to switch, nothing to put back
        pass
    assert optimizer.calls == [] and not in_train_mode(optimizer)
    optimizer.train()
    with eval_mode([optimizer]):
        assert not in_train_mode(optimizer)
    assert optimizer.calls == ["train", "eval", "train"] and in_train_mode(optimizer)


def test_an_optimizer_without_modes_is_left_alone():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    assert not has_modes(sgd) and in_train_mode(sgd)
    with eval_mode([sgd]):
        pass


def test_a_zero_redundancy_optimizer_is_switched_through_its_inner_one(tmp_path):
    from torch import distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from engine_opt.optim.modes import set_mode

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        zero = ZeroRedundancyOptimizer([torch.nn.Parameter(torch.ones(1))], optimizer_class=ModalSGD)
        assert has_modes(zero) and not in_train_mode(zero)
        set_mode(zero, train=True)
        assert zero.optim.calls == ["train"] and in_train_mode(zero)
    finally:
        dist.destroy_process_group()
