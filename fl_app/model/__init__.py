"""The classifier: backbones, the head, and the cache of frozen activations."""
