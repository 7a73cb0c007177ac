"""A ClientApp with two adversarial virtual nodes, for end-to-end tests of robust aggregation.

It is fl_app's ClientApp (`fl_app.client_app.app`, its mods included) behind one
more mod that corrupts train replies as they leave a node: partition
``SCALED_PARTITION`` multiplies every array it returns by ``SCALE`` (its whole
model, so the update the server computes against what it sent is huge), and
partition ``CLAIMING_PARTITION`` claims ``CLAIM`` training examples. Evaluate
replies stay honest. `write_app` makes a Flower app folder of this module whose
ServerApp and run config are the repository's own.
"""

from __future__ import annotations

import shutil
import tomllib
from logging import WARNING
from pathlib import Path

import tomli_w
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import log

from fl_app.client_app import app as fl_app_client

SCALED_PARTITION = 0
SCALE = 1e4
CLAIMING_PARTITION = 1
CLAIM = 10**9


def _scaled(arrays: ArrayRecord) -> ArrayRecord:
    scaled = {}
    for key, array in arrays.items():
        value = array.numpy()
        # float32 stays float32: a dtype change would be rejected as malformed, and
        # that is not the attack under test.
        scaled[key] = Array(value * value.dtype.type(SCALE))
    return ArrayRecord(scaled)


def adversary_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Corrupt this node's train reply if its partition is one of the adversaries."""
    reply = call_next(msg, context)
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
        return reply
    partition = int(context.node_config.get("partition-id", -1))
    if partition in (SCALED_PARTITION, CLAIMING_PARTITION):
        # Node ids are drawn at random: the log says which one the server should reject.
        log(WARNING, "Adversary partition %d is node %d", partition, context.node_id)
    if partition == SCALED_PARTITION:
        for name, arrays in list(reply.content.array_records.items()):
            reply.content[name] = _scaled(arrays)
    elif partition == CLAIMING_PARTITION:
        for name, metrics in list(reply.content.metric_records.items()):
            reply.content[name] = MetricRecord({**metrics, "num-examples": CLAIM})
    return reply


def behind(mod: Mod) -> ClientApp:
    """fl_app's ClientApp, its own mods included, behind one more mod."""
    wrapped = ClientApp(mods=[mod])

    @wrapped.train()
    def train(msg: Message, context: Context) -> Message:
        return fl_app_client(msg, context)

    @wrapped.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return fl_app_client(msg, context)

    return wrapped


app = behind(adversary_mod)


def write_app(folder: Path, module: Path = Path(__file__)) -> Path:
    """Write a Flower app folder whose ClientApp is ``module``'s ``app``; return the folder.

    Its ``[tool.flwr.app]`` is the repository's with the ClientApp swapped, so the
    ServerApp and every run-config key and default stay the repository's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    module = module.resolve()
    # Other faulty apps build on this module's `behind`.
    for source in {module, Path(__file__).resolve()}:
        shutil.copy(source, folder / source.name)
    repo = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    project = {k: repo["project"][k] for k in ("version", "description", "license")}
    # Its FAB holds these modules alone: the repository's fab-include names fl_app/.
    flwr_app = {k: v for k, v in repo["tool"]["flwr"]["app"].items() if k != "fab-include"}
    pyproject = {
        # Its dependencies are fl_app, installed where the SuperLink runs ClientApps.
        "project": {**project, "name": "fl-app-adversary", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    **flwr_app,
                    "components": {**flwr_app["components"], "clientapp": f"{module.stem}:app"},
                }
            }
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return folder
