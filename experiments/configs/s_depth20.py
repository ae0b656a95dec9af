"""ResNet-S, depth 20 (n = 6), CIFAR-10; ``s_depth20.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet_s", n=6, dataset=dataset)
