"""the baseline ResNet, depth 18 (n = 3), CIFAR-10; ``r_depth18.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet", n=3, dataset=dataset)
