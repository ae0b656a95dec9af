"""the baseline ResNet, depth 72 (n = 12), CIFAR-10; ``r_depth72.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet", n=12, dataset=dataset)
