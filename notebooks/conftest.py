"""For `python -m pytest --nbval-lax notebooks` (the test command runs them through tests/test_notebooks.py):
each one talks to real vLLM in a real kernel, so they carry those markers and the quick subset
(`-m "not vllm and not kernel"`) leaves them out."""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.kernel)
