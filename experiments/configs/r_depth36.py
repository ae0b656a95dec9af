"""the baseline ResNet, depth 36 (n = 6), CIFAR-10; ``r_depth36.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet", n=6, dataset=dataset)
