import hashlib
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squeeze.cli.app import app


CROSS_COMPILER = "aarch64-linux-gnu-g++"
# The arm-a72 target cross-compiles; a fresh machine may not have the compiler (scripts/setup.sh installs it
# where it runs as root on Debian/Ubuntu).
needs_cross_compiler = pytest.mark.skipif(
    shutil.which(CROSS_COMPILER) is None,
    reason=f"{CROSS_COMPILER} is not on PATH: apt-get install g++-aarch64-linux-gnu (Debian/Ubuntu)")


def pytest_configure(config):
    # Tests train and prune tiny models: one thread avoids oversubscribing the cores when the machine is
    # busy (2 threads were 20x slower at load 5 on 2 cores). Latency is measured in worker processes.
    import torch

    torch.set_num_threads(1)
    # One cache for the whole run (exports, trained zoo weights, measurements), never the user's.
    if "SQUEEZE_TEST_KEEP_CACHE" not in os.environ:
        import tempfile

        os.environ["SQUEEZE_CACHE_DIR"] = config._squeeze_cache = tempfile.mkdtemp(prefix="squeeze-test-cache-")


def pytest_unconfigure(config):
    if cache := getattr(config, "_squeeze_cache", None):  # a run's cache is its own: nothing is left in /tmp
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def cli():
    """Invoke the CLI in-process: `cli("info", "zoo:digits-cnn")` -> click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """digits-cnn as a squeeze checkpoint on disk: the input file that bad commands must leave alone."""
    from squeeze.model.loading import load_model, save_checkpoint

    path = tmp_path_factory.mktemp("input") / "digits.pt"
    save_checkpoint(path, load_model("zoo:digits-cnn"))
    return path


@pytest.fixture(scope="session")
def digits_model():
    """The trained zoo digits-cnn (trained once per test run into the run's cache)."""
    from squeeze.model.loading import load_model

    return load_model("zoo:digits-cnn")


@pytest.fixture(scope="session")
def digits_data(digits_model):
    """The built-in digits at digits-cnn's input shape."""
    from squeeze.data import load_data

    return load_data("digits", input_shape=digits_model.input_shape)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def fast():
    """Protocol flags that keep CLI measurements short in tests."""
    return ["--repeat", "5", "--warmup", "2", "--min-repeat-ms", "2"]
