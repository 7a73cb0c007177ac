"""Real deployments: certificates and keys, command lines, a local TLS federation."""
