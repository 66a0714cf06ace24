"""The scheduler example runs (briefly) and reports a sensible hit rate; the stubs match the
module."""

import ast
import importlib.util
import pathlib

import kvbm

HERE = pathlib.Path(__file__).resolve().parent


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scheduler_example_runs(capsys):
    scheduler = load(HERE.parent / "examples" / "scheduler.py")
    done, rate = scheduler.main(["--requests", "60", "--blocks", "1024", "--block-size", "16"])
    assert done == 60
    assert 0.0 < rate < 1.0  # multi-turn prompts re-use their history
    out = capsys.readouterr().out
    assert "requests/s" in out and "hit rate" in out


def test_stubs_name_every_public_item():
    stub = ast.parse((HERE.parent / "python" / "kvbm" / "_kvbm.pyi").read_text())
    names = set()
    for node in stub.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                public = {
                    n.name
                    for n in node.body
                    if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
                }
                runtime = getattr(kvbm, node.name)
                missing = {n for n in public if not hasattr(runtime, n)}
                assert not missing, f"{node.name}: stubbed but missing: {missing}"
                actual = {n for n in dir(runtime) if not n.startswith("_")}
                annotated = {
                    n.target.id
                    for n in node.body
                    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                }
                unstubbed = actual - public - annotated - {"args", "with_traceback", "add_note"}
                assert not unstubbed, f"{node.name}: not in the stubs: {unstubbed}"
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    exported = set(kvbm.__all__) - {"holding"}
    assert exported <= names, exported - names
    assert (HERE.parent / "python" / "kvbm" / "py.typed").exists()


def test_package_docstring_examples():
    import doctest

    failures, tests = doctest.testmod(kvbm)
    assert tests > 0 and failures == 0


def test_readme_python_example_runs():
    readme = (HERE.parents[1] / "README.md").read_text()
    section = readme.split("## Python package", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    m = scope["m"]
    assert len(m.match(scope["hashes"])) == 6
    m.check_invariants()
