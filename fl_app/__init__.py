"""fl_app: federated transfer learning of a Keras image classifier with Flower."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) would bury Flower's
# progress lines in every ClientApp and ServerApp process; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
