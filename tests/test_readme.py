"""The README's library example runs and does what its comments say."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme[readme.index("## jdl as a library"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  monkeypatch.chdir(tmp_path)  # its workdir, runs/lib, lands here
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)
  logits, features, results = namespace["logits"], namespace["features"], namespace["results"]
  assert logits.shape == (8, 10)
  assert {k: v.shape for k, v in features.items()} == {
      "block1": (8, 16, 16, 16), "block2": (8, 8, 8, 32), "block3": (8, 4, 4, 64),
      "pre_logits": (8, 500)}
  # fit trained the model and optimizer the example built, not a default.
  state, config = namespace["state"], results["config"]
  assert state.apply_fn.__self__.activation == "elu" and state.apply_fn.__self__.dropout == 0.2
  assert "ScaleByRmsState" in repr(state.opt_state)  # RMSprop, not the default Adam
  assert config["model_class"] == "CNN" and config["optimizer"] == "given to fit"
  assert results["epochs_run"] == 3 and 0.0 <= results["test_accuracy"] <= 1.0
  assert "Total params" in capsys.readouterr().out
