"""An MMEngine config trained as it is, and an MMEngine checkpoint resumed (optim_wrapper, param_scheduler).

python examples/mmengine_config.py                  # train 4 epochs from the config below
python examples/mmengine_config.py --resume CKPT    # go on from a checkpoint MMEngine's runner saved at an epoch's end

The config's three sections are MMEngine's, unchanged: `optim_wrapper` (with `paramwise_cfg`), `param_scheduler`
(a warmup per update, then a cosine per epoch converted to updates) and `train_cfg`. An MMEngine checkpoint holds
`state_dict` (the model), `optimizer` (the wrapper), `param_schedulers` and `meta` (`epoch`, `iter`).
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from engine_opt import build_optim_wrapper, build_param_scheduler, create_trainer
from engine_opt.handlers import SchedulerHandler

cfg = dict(
    optim_wrapper=dict(
        type="OptimWrapper",
        clip_grad=dict(max_norm=1.0),
        optimizer=dict(type="AdamW", lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
        paramwise_cfg=dict(
            norm_decay_mult=0.0,
            bias_decay_mult=0.0,
            custom_keys={".cls_token": dict(decay_mult=0.0), "head": dict(lr_mult=10.0)},
        ),
    ),
    param_scheduler=[
        dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=8),
        dict(type="CosineAnnealingLR", eta_min=1e-5, by_epoch=True, begin=1, end=4, convert_to_iter_based=True),
    ],
    train_cfg=dict(by_epoch=True, max_epochs=4),
)


class TinyViT(nn.Module):
    """Patches of a 1-D signal, a class token, two transformer blocks and a head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(4, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(
            *(nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True) for _ in range(2))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x.unflatten(-1, (-1, 4)))
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 32, generator=generator)
    y = (x[:, :16].sum(1) > 0).long() + (x[:, 16:].sum(1) > 1).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]  # 6 batches an epoch


def main(argv: list[str] | None = None) -> nn.Module:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", metavar="CKPT", help="an MMEngine runner's checkpoint, saved at an epoch's end")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyViT()
    data = make_data()
    max_epochs = cfg["train_cfg"]["max_epochs"]
    optim_wrapper = build_optim_wrapper(model, cfg["optim_wrapper"])
    # epoch_length counts applied updates per epoch: with accumulative_counts=1, one per batch
    schedulers = build_param_scheduler(
        optim_wrapper, cfg["param_scheduler"], epoch_length=len(data), max_epochs=max_epochs
    )
    trainer = create_trainer(model, optim_wrapper, F.cross_entropy)
    SchedulerHandler(schedulers).attach(trainer)

    if args.resume:
        # MMEngine's runner pickles more than tensors (its message hub): open only checkpoints you trust
        checkpoint = torch.load(args.resume, weights_only=False)
        expected = ("meta", "state_dict", "optimizer", "param_schedulers")
        if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in expected):
            found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            parser.error(
                f"{args.resume} is not a checkpoint of MMEngine's runner: it holds {found}, not {list(expected)} "
                "(engine_opt's own checkpoints resume with resume_from_latest, or engine-opt train --resume)"
            )
        epoch, iteration = checkpoint["meta"]["epoch"], checkpoint["meta"]["iter"]
        if iteration != epoch * len(data):
            parser.error(f"{args.resume} was saved mid-epoch (iteration {iteration}); pass one saved at an epoch's end")
        model.load_state_dict(checkpoint["state_dict"])
        optim_wrapper.load_state_dict(checkpoint["optimizer"])  # MMEngine's one group per parameter, regrouped
        for scheduler, state in zip(schedulers, checkpoint["param_schedulers"], strict=True):
            scheduler.load_state_dict(state)
        trainer.load_state_dict(dict(epoch=epoch, max_epochs=max_epochs, epoch_length=len(data)))
    state = trainer.run(data, max_epochs=max_epochs)
    with torch.no_grad():
        accuracy = torch.cat([model(x).argmax(1) == y for x, y in data]).float().mean().item()
    print(f"epoch {state.epoch}, updates applied {state.optim_updates}, lr {optim_wrapper.get_lr()['lr']}")
    print(f"training accuracy {accuracy:.2f}")
    return model


if __name__ == "__main__":
    main()
