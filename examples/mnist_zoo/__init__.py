"""MNIST classifiers built from torchvision, trained and imported into unlearnd as a user would (see README.md)."""
