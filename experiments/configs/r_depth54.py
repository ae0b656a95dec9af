"""the baseline ResNet, depth 54 (n = 9), CIFAR-10; ``r_depth54.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet", n=9, dataset=dataset)
