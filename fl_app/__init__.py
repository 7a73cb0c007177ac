"""fl_app: federated transfer learning of a Keras image classifier with Flower."""
