import importlib
import subprocess
import sys

import qwen_agent
from qwen_agent import errors


def test_every_public_name_resolves():
    for name in qwen_agent.__all__:
        assert getattr(qwen_agent, name) is not None, name


def test_import_is_lazy():
    # importing the package must not pull in torch or Jupyter; the tokenizer alone must not either
    code = "import sys, qwen_agent; qwen_agent.QwenTokenizer; print('torch' in sys.modules, 'jupyter_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_errors_share_one_root():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.QwenAgentError), name
    assert set(errors.__all__) == {
        n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)
    }
    # each class is drawn in the module docstring's tree
    for name in errors.__all__:
        assert name in errors.__doc__, name


def test_cli_help(capsys):
    cli = importlib.import_module("qwen_agent.cli")
    try:
        cli.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "tokenize" in capsys.readouterr().out
