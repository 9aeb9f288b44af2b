"""Training, fine-tuning and evaluation shared by all compression methods."""

from squeeze.train.loop import EvalResult, evaluate, train_classifier

__all__ = ["EvalResult", "evaluate", "train_classifier"]
