"""Configuration: the model, its reader and its checks."""
