"""Quickstart: ResNet-D (n = 2) on scikit-learn's handwritten digits, which ship with the
package — no download, a minute or two on a laptop CPU."""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.source = "embedded"
    config.data.augment_pad = 0  # 8×8 images: no crop (98% with 1, 99% without)
    config.data.augment_flip = False  # digits are not mirror-symmetric
    config.model.variant = "resnet_d"
    config.model.n = 2
    config.batch_size = 64
    config.num_train_steps = 1500
    config.eval_every = 250
    config.log_every = 50
    config.checkpoint_every = 500
    config.final_average_steps = 500
    config.runtime.steps_per_dispatch = 50
    config.runtime.eval_batch_size = 360
    config.optim.decay_every = 1000
    return config
