"""Small reference models shipped with the library (used by the demo, benchmarks and recipes)."""

from .cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification

__all__ = ["CifarResNetConfig", "CifarResNetForImageClassification"]
