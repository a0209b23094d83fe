"""A model soup: several fine-tunes from one start, ending with the mean of their weights.

Fine-tuning a small model from a pretrained start is noisy: the same recipe with another data order moves a
task score by a few points. Members trained from the *same* weights (the pretrained base and the task's warm-up,
head included) stay in one basin, so their weights can be averaged into one model that scores about as well as
the ensemble of the members, above their mean, at the inference cost of one (Wortsman et al. 2022, "Model soups",
the uniform soup). The cost is training: `train.soup` members take that many times the fine-tuning steps.

Member 0 is the run itself (its checkpoints, metrics and plots are the run folder's, exactly what the recipe
without a soup trains); member k trains in `members/k/` on its own stretch of the shuffled batch stream, the
stretch a run k times as long would read next. The start is saved in `members/start.safetensors`, so a resumed run
starts its remaining members from the same weights; it skips finished members and resumes the one that was cut
off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.run_folder import RunFolder, load_tensors, save_tensors
from lmforge.train.checkpoint import mean_state
from lmforge.train.distributed import world
from lmforge.train.trainer import Objective, TrainConfig, train


def train_soup(
    model: nn.Module,
    objective: Objective,
    batch_for: Callable[[int], Any],
    config: TrainConfig,
    run_dir: str | Path,
    **options: Any,
) -> None:
    """Train `config.soup` members from `model`'s current weights (see the module text) and leave their mean in
    `model`; `options` are `train`'s (evaluate, resume, progress, batches_are_local)."""
    if config.fsdp:
        raise UserError("train.soup needs whole weights on every process to average them: use DDP, not train.fsdp")
    run_dir = Path(run_dir)
    start_file = run_dir / RunFolder.MEMBERS / RunFolder.MEMBERS_START
    if options.get("resume") and start_file.is_file():
        # The members' start as the run began: a head a resumed process draws again (unseeded) would differ.
        model.load_state_dict(load_tensors(start_file, next(model.parameters()).device))
    elif world().main:
        start_file.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(start_file, model.state_dict())
    start = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    micro_batches_per_member = config.max_steps * config.grad_accum

    def trained_members() -> Iterator[dict[str, torch.Tensor]]:
        """Each member's final weights, as it finishes (read before the next member trains)."""
        for member in range(config.soup):
            model.load_state_dict(start)
            offset = member * micro_batches_per_member
            folder = run_dir if member == 0 else run_dir / RunFolder.MEMBERS / str(member)
            if options.get("progress", True):
                print(f"soup member {member + 1} of {config.soup} ({folder})")
            train(model, objective, lambda index, offset=offset: batch_for(offset + index), config, folder, **options)
            yield model.state_dict()

    model.load_state_dict(mean_state(trained_members()))
