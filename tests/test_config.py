"""The run-config schema: pyproject and every Hydra group match it, bad input is refused."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

import config_table
import hydra
import noniid
import pytest
from omegaconf import OmegaConf

from fl_app.config import RunConfig, defaults, fields, flower_key
from fl_app.launch.experiment import CONF_DIR, check_config, hydra_path, precheck
from fl_app.values import HDF5_SIGNATURE

PYPROJECT = CONF_DIR.parent / "pyproject.toml"
# Every folder of conf/ with YAML files is a group; config.yaml's defaults list picks one
# option of each of GROUPS, while PRESETS are added on the command line (`+group=option`).
ALL_GROUPS = {
    folder.relative_to(CONF_DIR).as_posix(): sorted(p.stem for p in folder.glob("*.yaml"))
    for folder in CONF_DIR.rglob("*")
    if folder.is_dir() and any(folder.glob("*.yaml"))
}
PRESET_NAMES = ("experiment", "noniid/split", "noniid/algorithm")
GROUPS = {g: options for g, options in ALL_GROUPS.items() if g not in PRESET_NAMES}
PRESETS = {g: options for g, options in ALL_GROUPS.items() if g in PRESET_NAMES}


def compose(*overrides: str):
    with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra.compose("config", overrides=list(overrides))


def test_groups_are_the_documented_ones():
    assert GROUPS == {
        "federation": ["deployment", "deployment-tls", "ray-cluster", "simulation"],
        "model": ["efficientnet_lite0", "resnet50"],
        "dataset": ["cifar10", "fashion_mnist", "images", "mnist"],
        "partitioner": ["dirichlet", "iid"],
        "strategy": ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi"],
        "dp": ["client", "none", "server"],
        "secure_aggregation": ["none", "secagg+"],
    }
    assert PRESETS == {
        "experiment": ["noniid"],
        "noniid/split": ["dirichlet_0.1", "dirichlet_0.5", "iid"],
        "noniid/algorithm": ["fedadam", "fedavg", "fedavgm", "fedprox_mu0.01", "fedprox_mu1"],
    }
    # The benchmark's own list of what it sweeps is these options.
    assert sorted(noniid.SPLITS) == PRESETS["noniid/split"]
    assert sorted(noniid.ALGORITHMS) == PRESETS["noniid/algorithm"]


@pytest.mark.parametrize(
    "split,algorithm",
    [(s, a) for s in PRESETS["noniid/split"] for a in PRESETS["noniid/algorithm"]],
)
def test_every_job_of_the_noniid_benchmark_composes(split, algorithm):
    run_config = check_config(
        compose("+experiment=noniid", f"+noniid/split={split}", f"+noniid/algorithm={algorithm}")
    )
    budget = {
        "backbone": "efficientnet_lite0",
        "weights": "imagenet",
        "fine-tune-layers": 0,
        "input-size": 64,
        "max-examples-per-node": 0,
        "max-test-examples": 0,
        "min-available-nodes": 10,
        "personalize-epochs": 1,
    }
    assert {key: run_config[key] for key in budget} == budget
    partitioner, _, alpha = split.partition("_")
    assert run_config["partitioner"] == partitioner
    if alpha:
        assert run_config["dirichlet-alpha"] == float(alpha)
    strategy, _, mu = algorithm.partition("_mu")
    assert run_config["strategy"] == strategy
    if mu:
        assert run_config["proximal-mu"] == float(mu)


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes_against_the_schema(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if option == "deployment-tls":
        ca = tmp_path / "ca.crt"
        ca.write_text("certificate")
        overrides.append(f"federation.root_certificates={ca}")
    if option == "ray-cluster":
        overrides.append("federation.ray_address=10.0.0.1:6379")
    if option == "images":  # the user's own folder: required
        (tmp_path / "photos" / "cat").mkdir(parents=True)
        overrides.append(f"dataset.name={tmp_path / 'photos'}")
    cfg = compose(*overrides)
    assert OmegaConf.missing_keys(cfg) == set()
    run_config = check_config(cfg)
    if group == "dataset" and option != "images":
        assert run_config["dataset"] == option
    if option == "images":
        assert run_config["dataset"] == str(tmp_path / "photos")
        assert run_config["input-size"] == 224 and run_config["max-examples-per-node"] == 0
    if group == "partitioner":
        assert run_config["partitioner"] == option
    if group == "strategy":
        assert run_config["strategy"] == option
    if group == "model":
        assert run_config["backbone"] == option
    if group == "federation":
        assert cfg.federation.kind == option.removesuffix("-tls")


def test_pyproject_declares_every_key_of_the_schema_with_its_type_and_default():
    flower = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert list(flower) == list(defaults()), "keys added, dropped or reordered in pyproject"
    for spec in fields():
        value = flower[flower_key(spec)]
        assert type(value) is spec.type or (spec.type is float and type(value) is int), spec.name
    assert flower == defaults(), "defaults drifted apart (pyproject, fl_app/config.py)"
    assert RunConfig.parse(flower) == RunConfig()


def test_the_default_hydra_config_is_the_schema_default():
    run_config = check_config(compose())
    assert {**run_config, "results-dir": RunConfig().results_dir} == defaults()


def test_hydra_paths():
    paths = {flower_key(spec): hydra_path(spec) for spec in fields()}
    assert paths["num-server-rounds"] == "num_server_rounds"
    assert paths["fraction-train"] == "strategy.fraction_train"
    assert paths["dataset"] == "dataset.name"
    assert paths["dirichlet-alpha"] == "partitioner.dirichlet_alpha"
    assert paths["results-dir"] is None  # the launcher sets it per job


@pytest.mark.parametrize(
    "hydra_override,flower_override",
    [
        ("strategy.fraction_train=1.5", {"fraction-train": 1.5}),
        ("model.input_size=16", {"input-size": 16}),
        ("model.backbone=mobilenet", {"backbone": "mobilenet"}),
        ("dataset.name=svhn", {"dataset": "svhn"}),
        ("model.augmentation=rotate", {"augmentation": "rotate"}),
    ],
)
def test_flower_and_hydra_refuse_a_bad_value_with_the_same_line(hydra_override, flower_override):
    with pytest.raises(ValueError) as flower_error:
        RunConfig.parse({**defaults(), **flower_override})
    hydra_error = precheck([hydra_override])
    path, key = hydra_override.split("=")[0], next(iter(flower_override))
    assert hydra_error == str(flower_error.value).replace(key, path, 1)


def test_a_weights_file_is_checked_only_where_it_is_read():
    bad = {**defaults(), "weights": "/no/such/start.weights.h5"}
    assert RunConfig.parse(bad, check_files=False).weights_file.name == "start.weights.h5"
    with pytest.raises(ValueError) as error:
        RunConfig.parse(bad)
    assert str(error.value).startswith("weights='/no/such/start.weights.h5' is not allowed")


NOT_WEIGHTS = "it is not a Keras weights file (HDF5 / .keras zip)"


@pytest.mark.parametrize(
    "file_name,content",
    [
        ("start.weights.h5", b"a text file, renamed\n"),
        ("start.h5", b""),
        ("start.h5", b"PK\x03\x04 a zip is not an .h5 file"),
        ("final.keras", HDF5_SIGNATURE + bytes(64)),  # HDF5 is not a .keras zip
    ],
)
def test_a_weights_file_must_be_hdf5_or_a_keras_zip_by_its_suffix(tmp_path, file_name, content):
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        RunConfig.parse({**defaults(), "weights": str(path)})
    assert str(error.value) == f"weights={str(path)!r} is not allowed: {NOT_WEIGHTS}"
    # The launcher refuses it with the same line, before anything starts.
    assert precheck([f"model.weights={path}"]) == "model." + str(error.value)


def test_real_hdf5_and_keras_zip_files_pass_the_weights_check(tmp_path):
    import h5py  # Keras's own HDF5 library

    with h5py.File(tmp_path / "start.weights.h5", "w") as file:
        file["kernel"] = [1.0, 2.0]
    with zipfile.ZipFile(tmp_path / "final.keras", "w") as file:
        file.writestr("config.json", "{}")
    for name in ("start.weights.h5", "final.keras"):
        weights = str(tmp_path / name)
        assert RunConfig.parse({**defaults(), "weights": weights}).weights == weights


@pytest.mark.parametrize(
    "results_dir,folder",
    [
        ("/proc/x/{run_id}", "/proc"),  # a folder even root cannot write into
        ("TMP/notes.txt/{time}-run{run_id}", "TMP/notes.txt"),  # below a file
    ],
)
def test_results_dir_must_be_makeable_in_a_writable_folder(tmp_path, results_dir, folder):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    results_dir, folder = (text.replace("TMP", str(tmp_path)) for text in (results_dir, folder))
    with pytest.raises(ValueError) as error:
        RunConfig.parse({**defaults(), "results-dir": results_dir})
    assert str(error.value) == (
        f"results-dir={results_dir!r} is not allowed: {folder} is not a writable folder"
    )
    # Nodes never write it: they do not check it.
    assert RunConfig.parse({**defaults(), "results-dir": results_dir}, check_files=False)


def test_a_results_dir_that_can_be_made_passes_and_is_not_made(tmp_path):
    results_dir = f"{tmp_path}/runs/{{time}}-run{{run_id}}"
    assert RunConfig.parse({**defaults(), "results-dir": results_dir}).results_dir == results_dir
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["strategy.fraction_train=1.5"],
            "strategy.fraction_train=1.5 is not allowed: expected a number in (0, 1]",
        ),
        (
            ["partitioner.dirichlet_alpha=0"],
            "partitioner.dirichlet_alpha=0.0 is not allowed: expected a number > 0",
        ),
        (["model.input_size=16"], "model.input_size=16 is not allowed: expected an integer >= 32"),
        (
            ["model.backbone=mobilenet"],
            "model.backbone='mobilenet' is not allowed: "
            "expected one of resnet50, efficientnet_lite0",
        ),
        (
            ["model=efficientnet_lite0", "model.fine_tune_layers=150"],
            "model.fine_tune_layers=150 is not allowed with model.backbone='efficientnet_lite0': "
            "expected an integer in 0..141",
        ),
        (
            ["model.weights=/no/such/weights.h5"],
            "model.weights='/no/such/weights.h5' is not allowed",
        ),
        (
            ["model.weights=/etc/passwd"],
            "model.weights='/etc/passwd' is not allowed: expected imagenet, none, or an existing "
            ".keras/.weights.h5/.h5 weights file",
        ),
        (
            ["federation=deployment-tls"],
            "federation.root_certificates='certificates/ca.crt' is not a file",
        ),
        (
            ["strategy.fraction_train=abc"],
            "Value 'abc' of type 'str' could not be converted to Float",
        ),
        (["num_server_rounds=0.5"], "num_server_rounds=0.5"),
        (
            ["partitioner=shards"],
            "Could not find 'partitioner/shards' Available options in 'partitioner': dirichlet iid",
        ),
        (["foo=1"], "Could not override 'foo'"),
        (["+model.foo=1"], "model.foo is not a key of the experiment config"),
        (
            ["federation.num_supernodes=0"],
            "federation.num_supernodes=0 is not allowed: expected an integer >= 1",
        ),
        (
            ["federation=ray-cluster"],
            "federation.ray_address is missing: expected the Ray head's HOST:PORT",
        ),
        (
            ["federation=ray-cluster", "federation.ray_address=head"],
            "federation.ray_address='head' is not allowed: expected HOST:PORT of the Ray head",
        ),
        (["-m", "strategy.fraction_train=0.5,2.0"], "strategy.fraction_train=2.0 is not allowed"),
        (["partitioner=iid,dirichlet"], "sweep values (a,b) need multirun: add -m"),
    ],
)
def test_bad_input_is_one_line_naming_key_value_and_what_is_allowed(argv, expected):
    error = precheck(argv)
    assert error is not None and "\n" not in error
    assert expected in error


def test_good_sweeps_pass_the_check():
    assert precheck(["-m", "partitioner=iid,dirichlet", "strategy.fraction_train=0.5,1.0"]) is None


def test_launcher_exits_2_with_one_stderr_line_before_starting_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fl_app.launch.experiment", "dataset.val_fraction=1.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: dataset.val_fraction=1.5 is not allowed: expected a number in [0, 1)"]
    assert not (tmp_path / "outputs").exists()


def test_printing_the_config_runs_nothing_and_exits_0(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fl_app.launch.experiment", "--cfg", "job", "partitioner=dirichlet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "name: dirichlet" in done.stdout and "num_server_rounds: 3" in done.stdout
    assert not (tmp_path / "outputs").exists()


def test_the_configuration_table_of_the_docs_is_the_schema():
    _, table, _ = config_table.split_page(config_table.PAGE.read_text(encoding="utf-8"))
    assert table == config_table.markdown_table(), f"regenerate it: {config_table.REGENERATE}"


def test_config_launch_and_deploy_never_import_keras():
    modules = ["fl_app.config", "fl_app.launch.experiment", "fl_app.deploy.local_federation"]
    check = (
        f"import sys; import {', '.join(modules)};"
        " heavy = {'keras', 'tensorflow'} & set(sys.modules); assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
