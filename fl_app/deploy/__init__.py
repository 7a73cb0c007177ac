"""Real deployments: certificates and keys, command lines, a local TLS federation.

A deployed federation is one ``flower-superlink`` with TLS and SuperNode
authentication, serving its Fleet (SuperNodes), Control (``flwr`` CLI) and
Runtime (its own ServerApps) APIs on ONE loopback port, a Fleet gateway that
serves the Fleet API alone to the devices, and any number of
``flower-supernode`` processes, each with its own key pair and data folder.
`pki` makes the certificates and keys, `checks` checks inputs and addresses,
`commands` builds the command lines and `start` starts them, `gateway` is the
Fleet gateway. `local_federation` runs a whole federation on loopback (its
processes in `federation_processes`, its saved state in `federation_state`, its
data folders from `node_data`). `cli` is ``fl-app deploy``, `local_cli`
``fl-app local``.
"""


class DeploymentError(RuntimeError):
    """A bad input or a failed step of a deployment, as one line for the user."""
