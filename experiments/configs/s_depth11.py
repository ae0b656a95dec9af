"""ResNet-S, depth 11 (n = 3), CIFAR-10; ``s_depth11.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet_s", n=3, dataset=dataset)
