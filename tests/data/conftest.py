import pytest

from rlaif_jax.data.tokenize import build_test_tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_test_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)
