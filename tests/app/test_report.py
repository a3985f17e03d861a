"""What a run shows: the summary reports the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine_opt.app.report import Result, summary


def test_the_summary_states_what_happened():
    result = Result("gan", 2, 128, 1.25, {"gen_loss": 0.5}, 2, 120, 8, Path("runs/gan"), "runs/gan/c.pt", Path("x.pt"))
    text = summary(result)
    assert "trained gan to epoch 2 (128 iterations) in 1.2 s on 2 processes" in text
    assert "resumed from:     x.pt" in text and "updates:          120 applied, 8 skipped" in text
    assert "last epoch loss:  gen_loss 0.5000\n" in text
    partial = dataclasses.replace(result, loss_iterations=(16, 64))
    assert "last epoch loss:  gen_loss 0.5000   (its last 16 of 64 iterations: those run since the resume)" in (
        summary(partial)
    )


def test_the_summary_names_the_update_the_config_chose_per_member():
    import torch

    from engine_opt import build_optim_wrapper
    from engine_opt.app.report import implementation

    model = torch.nn.ModuleDict({"gen": torch.nn.Linear(2, 2), "disc": torch.nn.Linear(2, 1)})
    chosen = {"optimizer": {"type": "AdamW"}, "implementation": "auto"}
    wrappers = build_optim_wrapper(model, {"gen": chosen, "disc": {"optimizer": {"type": "SGD", "lr": 0.1}}})
    assert implementation(wrappers) == "gen 'fused' (auto)"
    assert implementation(wrappers["disc"]) is None
    result = Result("gan", 2, 128, 1.25, {"gen_loss": 0.5}, 1, 128, 0, Path("runs/gan"), None)
    assert "implementation" not in summary(result)
    assert "  implementation:   gen 'fused' (auto)\n" in summary(
        dataclasses.replace(result, implementation="gen 'fused' (auto)")
    )
