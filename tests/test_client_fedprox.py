"""FedProx on the node: the proximal term in the ClientApp's training, with real Messages.

Same tiny ResNet50 and node data as tests/test_client.py. What FedProx promises on a
node: at μ = 0 it is FedAvg, and with μ > 0 the weights a node returns stay closer
to the ones it received, whether it trains on cached activations or the full model.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import test_client
from test_client import arrays_of, context, message, round_config

from fl_app import client_task
from fl_app.model.classifier import build_head, compile_model, reset_optimizer
from fl_app.model.proximal import Proximal
from fl_app.schedule import FINE_TUNE, HEAD

# `make test` runs these again with KERAS_BACKEND=jax.
pytestmark = pytest.mark.jax

initial = test_client.initial
node = test_client.node
# Enough Adam steps (2 batches x 4 epochs) for the pull towards w_global to show.
EPOCHS = 4
MU = 1.0


def distance(reply, received) -> float:
    """L2 distance between the arrays a node returned and those it received."""
    trained = arrays_of(reply)
    return float(np.sqrt(sum(np.sum((trained[k] - received[k].numpy()) ** 2) for k in trained)))


def train(initial, node, phase: str, **run_config):
    msg = message(initial, round_config(phase=phase, learning_rate=1e-3))
    options = {"local-epochs": EPOCHS, **run_config}
    return client_task.train(msg, context(node, **options))


@pytest.fixture(scope="module")
def fedavg_head(initial, node):
    """A head-phase FedAvg reply, trained on cached pooled features."""
    return train(initial, node, HEAD, strategy="fedavg")


def test_fedprox_at_mu_zero_replies_exactly_what_fedavg_does(initial, node, fedavg_head):
    reply = train(initial, node, HEAD, strategy="fedprox", **{"proximal-mu": 0.0})
    fedavg, fedprox = arrays_of(fedavg_head), arrays_of(reply)
    assert list(fedprox) == list(fedavg)
    for key, array in fedprox.items():
        np.testing.assert_array_equal(array, fedavg[key], err_msg=key)
    for key in ("train_loss", "train_accuracy"):
        assert reply.content["metrics"][key] == fedavg_head.content["metrics"][key]


@pytest.mark.parametrize(
    ("phase", "feature_cache"),
    [
        pytest.param(HEAD, True, id="head-on-cached-features"),
        # A full ResNet50 trained twice: ~15 s.
        pytest.param(FINE_TUNE, False, id="fine-tune-full-model", marks=pytest.mark.e2e),
    ],
)
def test_fedprox_keeps_the_trained_weights_closer_to_the_global_model(
    initial, node, phase, feature_cache
):
    runs = {
        strategy: train(
            initial,
            node,
            phase,
            strategy=strategy,
            **{"proximal-mu": MU, "feature-cache": feature_cache},
        )
        for strategy in ("fedavg", "fedprox")
    }
    fedavg, fedprox = (distance(runs[s], initial) for s in ("fedavg", "fedprox"))
    print(f"{phase}: ‖w - w_global‖ fedavg {fedavg:.4f}, fedprox μ={MU} {fedprox:.4f}")
    assert 0 < fedprox < 0.9 * fedavg
    # The same arrays trained (the term covers exactly the trainable weights).
    changed = {
        strategy: {
            k for k, a in arrays_of(reply).items() if not np.array_equal(a, initial[k].numpy())
        }
        for strategy, reply in runs.items()
    }
    assert changed["fedprox"] == changed["fedavg"]
    assert np.isfinite(runs["fedprox"].content["metrics"]["train_loss"])


def test_proximal_at_mu_zero_trains_like_the_model_it_wraps():
    keras.utils.set_random_seed(0)
    head = build_head(3, 8)
    start = head.get_weights()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8)).astype("float32"), rng.integers(0, 3, 16)

    def fit(model, mu=None):
        head.set_weights(start)
        compile_model(model, 1e-2)
        reset_optimizer(model, 1e-2)
        if mu is not None:
            model.anchor(mu)
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        return head.get_weights()

    plain, wrapped = fit(head), fit(Proximal(head), 0.0)
    for a, b in zip(plain, wrapped, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    proximal = Proximal(head)
    fit(proximal, 10.0)
    # Evaluation reports the model's own loss: the term is for training only.
    assert proximal.evaluate(x, y, verbose=0)[0] == pytest.approx(
        head.evaluate(x, y, verbose=0)[0], rel=1e-6
    )
    assert float(proximal.proximal_term()) > 0
