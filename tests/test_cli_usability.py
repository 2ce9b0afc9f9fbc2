"""Usability of the command line and the package (issue 17): `t2r --help` without torch, `--version`, arguments
checked before a model loads, a light `import t2r` that still registers the converted classes with transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import t2r
import t2r.cli
from test_cli import run_cli

SRC = str(Path(t2r.__file__).resolve().parents[1])
EXIT_USAGE = 2


def run_python(code: str) -> subprocess.CompletedProcess:
    """`python -c CODE` in a fresh process that imports this checkout's t2r."""
    env = {"PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)



def test_help_of_every_command_imports_neither_torch_nor_transformers():
    proc = run_python(
        "import sys, t2r.cli.app as app\n"
        "parser = app.build_parser()\n"
        "texts = [parser.format_help()] + [p.format_help() for p in parser._subparsers._group_actions[0].choices.values()]\n"
        "assert all(texts)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_import_t2r_is_light_and_still_registers_with_transformers():
    proc = run_python(
        "import sys, t2r\n"
        "assert 'torch' not in sys.modules\n"
        "from transformers import AutoConfig\n"  # importing transformers registers t2r's classes
        "config = AutoConfig.for_model('t2r_llama')\n"
        "print(type(config).__name__, callable(t2r.convert), callable(t2r.save))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1:] == ["True", "True"]


def test_import_after_transformers_registers_at_once():
    proc = run_python("import transformers, t2r\nprint(transformers.AutoConfig.for_model('t2r_gpt2').model_type)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "t2r_gpt2"


def test_functions_keep_their_names_when_their_module_is_imported_first():
    """`t2r.convert` is the function, as with the eager imports, even after `import t2r.convert` (the module)."""
    proc = run_python("import t2r.convert, t2r.verify, t2r.generate, t2r.decode, t2r\n"
                      "print(all(callable(f) and f.__module__ == 't2r.' + f.__name__ "
                      "for f in (t2r.convert, t2r.verify, t2r.generate, t2r.decode)))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_public_api_names_resolve():
    for name in t2r.__all__:
        assert getattr(t2r, name) is not None, name
    assert "convert" in dir(t2r)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        t2r.nope  # noqa: B018


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"t2r {t2r.__version__}"


@pytest.mark.parametrize("argv, words", [
    (["convert", "--feature-map", "hedgehgo"], ["hedgehgo", "hedgehog"]),
    (["convert", "--feature-dim", "-3"], ["feature_dim"]),
    (["convert", "--keep-softmax-layers", "0,x"], ["--keep-softmax-layers"]),
    (["convert", "--mixer", "lstm"], ["lstm"]),
    (["distill", "some/dir", "--tokens", "lots"], ["--tokens"]),
    (["eval", "some/dir", "--ablate", "windw"], ["windw"]),
    (["generate", "some/dir", "--max-new-tokens", "0"], ["--max-new-tokens"]),
])
def test_arguments_checked_before_a_model_loads(capsys, monkeypatch, argv, words):
    """A typo ends in one error line before any model (or tokenizer) is read."""
    import t2r.persistence
    import t2r.sources

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module, name in [(t2r.sources, "load_model"), (t2r.persistence, "load"), (t2r.persistence, "load_tokenizer")]:
        monkeypatch.setattr(module, name, no_loading)
    code, out, err = run_cli(capsys, *argv)
    assert code == EXIT_USAGE, err
    assert "Traceback" not in err and "AssertionError" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"t2r {argv[0]}: error:") and all(w in line for w in words), line



@pytest.mark.parametrize("model, flags, words", [
    ("tiny", ["--keep-softmax-layers", "0,7"], ["[7] out of range", "0..2"]),
    ("tiny", ["--convert-layers", "1,5"], ["--convert-layers [5] out of range", "0..2"]),
    (None, ["--keep-softmax-layers", "0,40"], ["[40] out of range", "0..29"]),  # the GGUF header: 30 layers
])
def test_layer_lists_checked_against_the_config_before_the_weights_load(capsys, monkeypatch, tiny_model_dir, model,
                                                                         flags, words):
    import t2r.sources

    monkeypatch.setattr(t2r.sources, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    argv = ["convert", *([str(tiny_model_dir)] if model == "tiny" else []), *flags, "--out", "unused"]
    code, _, err = run_cli(capsys, *argv)
    line = err.strip().splitlines()[-1]
    assert code == EXIT_USAGE and line.startswith("t2r convert: error:") and all(w in line for w in words), line


# ------------------------------------------------------------------------------------------------------- packaging

def test_rdata_is_an_extra_and_the_austen_corpus_says_how_to_get_it(monkeypatch, tmp_path):
    import importlib.util
    import tomllib

    from t2r import corpora
    from t2r.errors import DataError

    project = tomllib.loads((Path(SRC).parent / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("rdata") for d in project["dependencies"])
    assert any(d.startswith("rdata") for d in project["optional-dependencies"]["corpora"])
    assert project["license"] == "Apache-2.0"  # an SPDX string: no setuptools deprecation warning
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rdata" else real_find_spec(
        name, *a))
    with pytest.raises(DataError, match=r"pip install 't2r\[corpora\]'"):
        corpora._austen(tmp_path)


def test_help_names_the_default_model_alias(capsys):
    code, out, _ = run_cli(capsys, "convert", "--help")
    assert code == 0 and "smollm2" in out and "gemma3-270m" in out


def test_pipeline_help_names_every_shipped_recipe(capsys):
    from t2r.stages.recipes import shipped_recipes

    code, out, _ = run_cli(capsys, "pipeline", "--help")
    flat = re.sub(r"-\s+", "-", " ".join(out.split()))  # argparse may wrap the help inside a hyphenated name
    missing = [name for name in shipped_recipes() if name not in flat]
    assert code == 0 and not missing, f"pipeline --help does not name the shipped recipes {missing}"


# ------------------------------------------------------------------------------------------------ training output

def test_quiet_also_quiets_transformers_bars(tmp_path, tiny_model_dir):
    """-q: no progress bar of transformers' (loading, writing shards) on stderr, only the result on stdout."""
    args = ["convert", str(tiny_model_dir), "--feature-map", "t2r", "--feature-dim", "8"]
    env = {"PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    loud = subprocess.run([sys.executable, "-m", "t2r", *args, "--out", str(tmp_path / "a")], capture_output=True,
                          text=True, env=env, check=False)
    quiet = subprocess.run([sys.executable, "-m", "t2r", "-q", *args, "--out", str(tmp_path / "b")],
                           capture_output=True, text=True, env=env, check=False)
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    assert "%|" in loud.stderr  # a bar without -q (the check below means something)
    assert "%|" not in quiet.stderr and "t2r:" not in quiet.stderr
    assert quiet.stdout.startswith("converted ")


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_also_quiets_plain_tqdm_bars(tmp_path, quiet):
    """transformers draws the GGUF de-quantizing bar with tqdm itself (not with its own switchable bars): -q turns
    tqdm off through its environment default, read when tqdm is imported, which happens after the flag is seen."""
    code = ("import sys, t2r.cli\n"
            f"t2r.cli.main({['-q'] if quiet else []} + ['convert', 'none.gguf', '--out', 'o'])\n"
            "from tqdm.auto import tqdm\n"
            "list(tqdm(range(3), desc='a bar'))\n")
    env = {"PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=False)
    assert run.returncode == 0 and "does not exist" in run.stderr
    assert ("a bar" in run.stderr) is not quiet


def test_training_labels_each_phase_and_plots_its_loss(tmp_path, capsys, tiny_converted_dir):
    """The progress bar says when it is evaluating (before, during, after training) and when it is training."""
    from t2r.cli.training import distill_command
    from t2r.train.settings import DistillSettings

    text = tmp_path / "corpus.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30)
    r = distill_command(str(tiny_converted_dir), data=str(text), options=DistillSettings(
        tokens="1k", eval_blocks=1, eval_every=8), out=str(tmp_path / "o"), block_size=64, progress=True)
    err = capsys.readouterr().err
    for phase in ("before training", "at step 8", "after training"):
        assert f"held-out evaluation ({phase})" in err, phase
    assert "training:" in err
    assert ".export" not in err  # no internal staging folder in the log
    # the run's loss plot: training loss and the three held-out evaluations
    assert r["plot"] == str(tmp_path / "o" / "loss.png")
    assert (tmp_path / "o" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from t2r.cli.render import render_distill

    assert render_distill(r).endswith(f"loss plot: {r['plot']}")
