"""fl_app: federated transfer learning of a Keras image classifier with Flower."""

from fl_app.gpu import share_gpus

# Before any module of the package imports Keras: see fl_app.gpu.
share_gpus()
