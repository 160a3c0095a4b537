"""moemesh: Mixture-of-Experts inference for machines that cannot hold the model."""
__version__ = "0.1.0"
