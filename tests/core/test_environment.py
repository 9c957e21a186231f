from importlib import metadata

from subseg.core import environment


def test_record_names_versions_commit_and_machine(tmp_path):
    env = environment.record("cpu")
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["packages"]["monai"] == metadata.version("monai")
    assert env["accelerator"] == "cpu" and env["device"] == "cpu" and env["torch_threads"] >= 1
    assert env["git_commit"]  # a commit here, or "not a git checkout" in an installed copy
    assert environment.git_commit(tmp_path) == "not a git checkout"
    line = environment.describe(env)
    assert f"torch {env['packages']['torch']}" in line and env["git_commit"] in line
