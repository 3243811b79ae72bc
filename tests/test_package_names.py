"""The package that imports its public names on first use (`lomar`) also names each one in an
`if TYPE_CHECKING:` import, from the module run time takes it from: a type checker or an IDE reads no module
`__getattr__`, and without those imports `lomar.LoMaR(` showed neither its signature nor its docstring."""

import ast
import importlib
import inspect

import pytest


def _type_checking_imports(module) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(module))
    blocks = [node for node in tree.body
              if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"]
    return {alias.asname or alias.name: node.module
            for block in blocks for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}


@pytest.mark.parametrize("package", ["lomar"])
def test_every_name_imported_on_first_use_is_imported_for_type_checkers_from_the_same_module(package):
    module = importlib.import_module(package)
    assert _type_checking_imports(module) == module._EXPORTS
    assert set(module._EXPORTS) <= set(module.__all__)
