"""Above the training loop: what turns runs into an experiment. No command-line parsing here;
`peftseg.cli` parses and prints, and calls:

- sweep.sweep_outcome: how many members of a Hydra multirun ran and failed, from their records;
- search: an Optuna study over methods and knobs (open_study, study_dir, work, summarize),
  with study_storage (opening and locking the storage), trial_workers (heartbeats, lost
  trials) and trial (one trial's run and its pruner);
- tracking / search_tracking: MLflow for sweeps (a Hydra callback) and for searches;
- objectives: the numbers a sweep or a study optimises, read from a run's record.
"""
