"""Small reference models and a name registry."""

from etda.models.logistic import LogisticRegression
from etda.models.mlp import MLP
from etda.models.registry import MODELS, create_model
from etda.models.resnet import ResNet9
from etda.models.transformer import CharTransformer

__all__ = ["CharTransformer", "MLP", "MODELS", "LogisticRegression", "ResNet9", "create_model"]
