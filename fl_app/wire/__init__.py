"""What travels between server and nodes: trainable-only exchange and compression."""
