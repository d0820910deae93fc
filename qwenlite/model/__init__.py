"""Model hyperparameters and forward passes."""
