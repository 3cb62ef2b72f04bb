"""The runnable examples in the package's docstrings (documentation is a contract)."""
import doctest
import importlib
import pkgutil

import pytest

import diffaccel.engines
import diffaccel.eval
import diffaccel.optimize



def _modules():
    for pkg in (diffaccel.optimize, diffaccel.engines, diffaccel.eval):
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}."):
            if not info.name.endswith(".__main__"):   # importing it would run the CLI
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
