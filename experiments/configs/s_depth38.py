"""ResNet-S, depth 38 (n = 12), CIFAR-10; ``s_depth38.py:cifar100`` for CIFAR-100."""

from experiments.configs.common import paper_config


def get_config(dataset=None):
    return paper_config("resnet_s", n=12, dataset=dataset)
