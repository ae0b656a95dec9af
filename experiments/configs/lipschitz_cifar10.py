"""The Lipschitz ResNet-S (stabnet.lipschitz; docs/mathematics.md §2, §6) on CIFAR-10: ResNet-S's
skeleton of depth 11 (n = 3) without BN, every layer bounded after every step, the margin-aware
loss of experiments/configs/lipschitz_digits.py with the margin scaled to the final 8×8 grid, and
ResNet-S's schedule; ``--config.schedule_scale=0.1`` is the short protocol."""

from experiments.configs import lipschitz_digits
from experiments.configs.common import paper_config


def get_config(dataset=None):
    config = paper_config("resnet_s_lipschitz", n=3, dataset=dataset)
    digits = lipschitz_digits.get_config()
    config.model.use_bn = False
    config.model.downsampling = digits.model.downsampling
    config.optim.regularizers = digits.optim.regularizers
    config.optim.learning_rate = digits.optim.learning_rate
    config.loss = digits.loss
    # The bound L ≤ (hw)^{-1/2} of the final grid: 1/8 on CIFAR's 8×8 against 1/2 on the digits'
    # 2×2, so the same certified radius m/(√2 L) needs a margin four times smaller.
    config.loss.margin = digits.loss.margin / 4
    return config
