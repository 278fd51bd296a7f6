import os

import pytest


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    env = dict(os.environ)
    env["COMPRESSOR_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # never the user's real cache
    env["OMP_NUM_THREADS"] = "1"
    return env
