"""The training loop of one run: run (data -> model -> train -> evaluate -> record), the
trainer and its hooks, evaluation, precision, optimiser, signals, run dirs and multi-process
launch. Below the experiments that repeat it (peftseg.experiments); above checkpoint files
and the model build, which it uses."""
