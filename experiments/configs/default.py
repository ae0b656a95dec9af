"""Default configuration: the paper's training protocol (docs/mathematics.md §4) for ResNet-D,
n = 3, CIFAR-10.

Named configs import this and change a few fields. Every field is checked by
:func:`stabnet.config.validate` before any work starts; unknown keys are refused.
"""

import math

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Multiplies every step count below and optim.decay_every (stabnet.config.Schedule):
    # 0.1 is the short protocol, the paper's schedule at a tenth of its length.
    config.schedule_scale = 1.0
    config.batch_size = 128  # global batch, split over all devices of all hosts
    config.num_train_steps = 70_000
    config.eval_every = 500  # evaluate on the whole test set every this many steps
    config.log_every = 100  # training metrics (means over the interval) every this many steps
    config.checkpoint_every = 5_000
    config.keep_checkpoints = 3
    config.final_average_steps = 5_000  # reported accuracy: mean of the evals in the last 5K steps
    config.on_nonfinite = "stop"  # NaN/Inf in loss, gradients or parameters: "stop" or "skip"
    config.progress_bar = True  # only shown when stderr is a terminal

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"
    config.data.source = "auto"  # auto | local | embedded | tfds
    config.data.local_dir = ""  # folder of <name>.npz; "" → $STABNET_DATA_DIR
    config.data.tfds_data_dir = ""  # "" → TFDS's default
    config.data.augment_pad = 4  # random crop after zero padding by this many pixels
    config.data.augment_flip = True  # random horizontal flip

    config.model = ml_collections.ConfigDict()
    config.model.variant = "resnet_d"  # resnet | resnet_d | resnet_s | resnet_s_certified |
    # resnet_s_lipschitz (no BN, every layer bounded; experiments/configs/lipschitz_digits.py)
    config.model.n = 3
    config.model.widths = (16, 32, 64)
    config.model.padding = "circular"  # circular | zeros
    config.model.use_bn = True
    config.model.pool_window = 3
    config.model.bn_momentum = 0.9
    config.model.bn_eps = 1e-5
    config.model.dtype = "float32"  # float32 | bfloat16 (compute; parameters stay float32)
    # Ablations of ResNet-D's layer (stabnet.layers.residual_form); "paper" keeps the variant's:
    config.model.sign = "paper"  # paper | minus | plus: the branch subtracted or added
    config.model.outer_bn = "paper"  # paper | frozen | trained: BN₀ (γ = 1, β = 0) or a trained BN
    config.model.outer_init = "paper"  # paper | abs_he | he: K₂ started ≥ 0 or signed
    # Layers n+1 and 2n+1: pool (the pooling layer (4.4)) | space_to_depth (resnet_s_lipschitz
    # only: x ↦ M·S(x) + b, S space-to-depth, ‖M‖₂ ≤ 1; stabnet.layers.downsampling_layer)
    config.model.downsampling = "pool"

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 0.1
    config.optim.momentum = 0.9
    config.optim.nesterov = False
    config.optim.decay_every = 24_000
    config.optim.decay_factor = 0.1
    config.optim.weight_decay = 1e-4  # λ of Table 4.1
    config.optim.regularizers = "paper"  # paper (Table 4.1) | frobenius | none
    config.optim.constraints = True  # K₂ ≥ 0 (ResNet-D), ‖A‖₂ ≤ max_operator_norm (ResNet-S)
    config.optim.max_operator_norm = math.sqrt(2.0)
    # ResNet-S's bound: auto | plain (projected SGD) | scale_carrying (the update on K/s, the
    # stored K = s·U rescaled; auto where the layer is blind to K's scale, constraints.py).
    config.optim.projection = "auto"

    # The data loss (stabnet.lipschitz.training_loss): cross_entropy (4.6) | margin_cross_entropy
    # (CE(T·(f − m·e_y))/T) | hinge (max(0, m − logit margin)); T and m unused by cross_entropy.
    config.loss = ml_collections.ConfigDict()
    config.loss.name = "cross_entropy"
    config.loss.temperature = 1.0
    config.loss.margin = 0.0

    # How fast, not what: every setting below gives the same run to float32 rounding (the norms'
    # squaring and fused: upper bounds within m^(2^-16)). The fast forms of the operators are
    # chosen per platform (stabnet.fast.select; auto: this platform's).
    config.runtime = ml_collections.ConfigDict()
    config.runtime.steps_per_dispatch = 20  # train steps in one device call (lax.scan; 1 on CPUs)
    config.runtime.on_device = True  # data set resident on the devices (fast path)
    config.runtime.eval_batch_size = 1000
    # Convolutions of the training step: auto (oneDNN on one CPU device where the cpu extra is
    # installed, in bfloat16 where the CPU has AVX-512; else XLA's) | xla | onednn.
    config.runtime.conv_impl = "auto"
    config.runtime.bn_stats = "one_pass"  # BN's batch statistics: one_pass | two_pass (reference)
    # ResNet-S's exact norms: auto (screened on CPUs, fused on NVIDIA GPUs, squaring on other
    # accelerators) | eigh (the reference) | screened | squaring | fused.
    config.runtime.norm_method = "auto"
    return config
