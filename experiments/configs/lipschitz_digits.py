"""The Lipschitz ResNet-S (stabnet.lipschitz; docs/mathematics.md §2, §6) on scikit-learn's
handwritten digits: no BN, every layer bounded after every step, margin-aware loss."""

from experiments.configs import quickstart


def get_config():
    config = quickstart.get_config()
    config.model.variant = "resnet_s_lipschitz"
    config.model.use_bn = False
    config.optim.regularizers = "none"  # weight decay shrinks the margins a bound network has
    # The paper's pooling layer bounded by ‖P‖₂ + ‖A_p‖₂ ≤ 1 passes almost no signal (chance
    # accuracy, stabnet.lipschitz); space-to-depth + a Haar-started ‖M‖₂ ≤ 1 keeps it.
    config.model.downsampling = "space_to_depth"
    config.optim.learning_rate = 0.02  # steps small against filters held at their bounds
    config.loss.name = "margin_cross_entropy"
    config.loss.temperature = 100.0
    config.loss.margin = 0.05  # logit units: radius 0.05/(√2 L) ≥ 0.07 at L ≤ 1/2
    return config
