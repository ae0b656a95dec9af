"""The paper's named configurations (docs/mathematics.md §3–§4), shared by the one-line config
files."""

import ml_collections

from experiments.configs import default
from stabnet import variants

DATASETS = ("cifar10", "cifar100")


def paper_config(variant: str, n: int, dataset: str | None = None) -> ml_collections.ConfigDict:
    """ResNet, ResNet-D or ResNet-S of depth parameter ``n`` with the paper's schedule.

    Learning rate 0.1 ÷ 10 every 24K steps for 70K steps, except ResNet-S on CIFAR-10: every
    32K steps for 93.5K steps (Section 5; each variant's
    :attr:`stabnet.variants.Variant.cifar10_schedule`). The baseline uses ResNet-D's schedule.
    """
    dataset = dataset or "cifar10"
    if dataset not in DATASETS:
        raise ValueError(f"config argument {dataset!r} is unknown; allowed: {', '.join(DATASETS)}")
    config = default.get_config()
    config.data.name = dataset
    config.model.variant = variant
    config.model.n = n
    record = variants.get(variant)
    schedule = record.cifar10_schedule if dataset == "cifar10" else variants.PAPER_SCHEDULE
    config.optim.decay_every, config.num_train_steps = schedule
    return config
