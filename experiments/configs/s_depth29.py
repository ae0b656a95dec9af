"""ResNet-S, depth 29 (n = 9), CIFAR-10; ``s_depth29.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet_s", n=9, dataset=dataset)
