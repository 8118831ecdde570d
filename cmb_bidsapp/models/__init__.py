"""Networks, training, knowledge distillation, inference and model bundles."""
