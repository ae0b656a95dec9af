"""ResNet-D, depth 72 (n = 12), CIFAR-10; ``d_depth72.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet_d", n=12, dataset=dataset)
