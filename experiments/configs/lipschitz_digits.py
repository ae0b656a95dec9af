"""The Lipschitz ResNet-S (stabnet.lipschitz; docs/mathematics.md §2, §6) on scikit-learn's
handwritten digits: no BN, every layer bounded after every step, margin-aware loss."""

from experiments.configs import quickstart


def get_config():
    config = quickstart.get_config()
    config.model.variant = "resnet_s_lipschitz"
    config.model.use_bn = False
    config.optim.regularizers = "none"  # weight decay shrinks the margins a bound network has
    return config
