"""The data folders of a local federation's SuperNodes: given, or prepared once and reused."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fl_app.deploy import DeploymentError
from fl_app.deploy.checks import require_dir


def node_data_dirs(
    num_nodes: int,
    data_dirs: Sequence[str | os.PathLike] | None,
    data_root: str | os.PathLike,
    dataset: str = "fashion_mnist",
    partitioner: str = "iid",
    seed: int = 0,
    max_examples: int = 0,
) -> list[Path]:
    """One data folder per node, each checked to be a folder.

    Parameters
    ----------
    num_nodes : int
        How many nodes.
    data_dirs : sequence of path, optional
        The folders, one per node; if not given, ``data_root/node-<i>``.
    data_root : str or os.PathLike
        Where those go: reused if every one holds ``partition.npz``, else
        prepared with `fl_app.data.prepare_node_dirs`.
    dataset, partitioner, seed, max_examples
        Passed to `fl_app.data.prepare_node_dirs`.

    Returns
    -------
    list of Path
        The folders, absolute.

    Raises
    ------
    DeploymentError
        If the number of ``data_dirs`` is not ``num_nodes``, or one is not a folder.
    """
    if data_dirs is not None:
        if len(data_dirs) != num_nodes:
            raise DeploymentError(f"{len(data_dirs)} data folders given for {num_nodes} nodes")
        folders = [Path(d).expanduser().resolve() for d in data_dirs]
    else:
        folders = _prepared(Path(data_root), num_nodes, dataset, partitioner, seed, max_examples)
    for folder in folders:
        require_dir(folder, "a node's data folder")
    return folders


def _prepared(
    root: Path, num_nodes: int, dataset: str, partitioner: str, seed: int, max_examples: int
) -> list[Path]:
    root = root.expanduser().resolve()
    dirs = [root / f"node-{i}" for i in range(num_nodes)]
    if all((d / "partition.npz").is_file() for d in dirs):
        return dirs
    from fl_app.data import prepare_node_dirs  # deferred: loads the dataset

    prepared = prepare_node_dirs(
        root,
        num_nodes,
        dataset=dataset,
        partitioner=partitioner,
        seed=seed,
        max_examples=max_examples,
    )
    return [Path(d).resolve() for d in prepared]
