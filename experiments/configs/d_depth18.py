"""ResNet-D, depth 18 (n = 3), CIFAR-10; ``d_depth18.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet_d", n=3, dataset=dataset)
