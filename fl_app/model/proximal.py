"""FedProx on a node: train a model with μ/2·‖w - w_global‖² added to its loss.

`Proximal` wraps a model (the full classifier, or the part of it after the cached
boundary) and shares its layers and variables: fitting the wrapper trains the
model. The anchors ``w_global`` and μ are non-trainable variables that `Proximal.anchor`
assigns before each round's fit, so a new round, or a new μ, retraces nothing. The term
covers the variables that were trainable when the wrapper was made: a phase that changes
them needs another wrapper (`fl_app.model.node_models` keys its cache by them).
"""

from __future__ import annotations

import keras
from keras import ops


class Proximal(keras.Model):
    """``model`` whose training loss adds FedProx's proximal term over its trainable weights.

    Parameters
    ----------
    model : keras.Model
        The model to train. Its trainable variables when the wrapper is made are the
        ones the term covers; its predictions, weights and variable paths are unchanged.

    Notes
    -----
    Evaluation (``training=False``) reports the model's own loss, without the term.
    The ``loss`` that ``fit`` reports includes it: it is what training minimises.
    """

    def __init__(self, model: keras.Model, **kwargs) -> None:
        super().__init__(name=f"{model.name}_proximal", **kwargs)
        self.inner = model
        self.paths = tuple(variable.path for variable in model.trainable_variables)
        # Variables rather than constants: assigning them each round keeps the traced step.
        self.mu = keras.Variable(0.0, trainable=False, name="proximal_mu")
        self.anchors = [
            keras.Variable(ops.zeros(v.shape, v.dtype), trainable=False, name=f"anchor_{i}")
            for i, v in enumerate(model.trainable_variables)
        ]
        self.built = True  # its only state is the wrapped model's and the anchors

    def call(self, inputs, training=None):
        """The wrapped model's output."""
        return self.inner(inputs, training=training)

    def anchor(self, mu: float) -> None:
        """Set μ and take the model's current trainable weights as ``w_global``."""
        self._check_trainable()
        self.mu.assign(mu)
        for anchor, variable in zip(self.anchors, self.inner.trainable_variables, strict=True):
            # A copy: on JAX an assigned variable shares the buffer, which training donates.
            anchor.assign(ops.copy(variable.value))

    def proximal_term(self):
        """μ/2·‖w - w_global‖² over the model's trainable weights (a scalar tensor)."""
        squares = [
            ops.sum(ops.square(variable - anchor))
            for variable, anchor in zip(self.inner.trainable_variables, self.anchors, strict=True)
        ]
        if not squares:  # nothing trains: nothing to hold back
            return ops.zeros(())
        return 0.5 * self.mu * ops.sum(ops.stack(squares))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled loss, plus the proximal term when training."""
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if training:
            self._check_trainable()
            loss = loss + self.proximal_term()
        return loss

    def _check_trainable(self) -> None:
        # A phase change would pair weights with the wrong anchors: fail loudly instead.
        paths = tuple(variable.path for variable in self.inner.trainable_variables)
        if paths != self.paths:
            raise RuntimeError(
                f"{self.inner.name}'s trainable variables changed since its Proximal "
                "wrapper was made: wrap it again"
            )
