"""Keras: the classifier and its backbones, the cache of frozen activations, a node's models."""
