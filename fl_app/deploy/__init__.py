"""Real deployments: certificates and keys, command lines, a local TLS federation.

A deployed federation is one ``flower-superlink`` with TLS and SuperNode
authentication, serving its Fleet (SuperNodes), Control (``flwr`` CLI) and
Runtime (its own ServerApps) APIs on ONE loopback port, a Fleet gateway that
serves the Fleet API alone to the devices, and any number of
``flower-supernode`` processes, each with its own key pair and data folder.
`pki` makes the certificates and keys, `commands` checks inputs and builds and
starts the command lines, `gateway` is the Fleet gateway, `local_federation`
runs a whole federation on loopback, and `cli` is ``fl-app deploy`` and
``fl-app local``.
"""


class DeploymentError(RuntimeError):
    """A bad input or a failed step of a deployment, as one line for the user."""
