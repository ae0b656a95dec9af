"""stabnet: forward-stable ResNets (Zhang & Schaeffer) in JAX/Flax."""
