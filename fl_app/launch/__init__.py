"""Starting and stopping Flower from Python: processes, the flwr CLI, experiments.

Nothing here imports Keras or TensorFlow.
"""
