"""The model: where the method lives in a transformers model, ChatModel, loading checkpoints, the packaged offline models."""
