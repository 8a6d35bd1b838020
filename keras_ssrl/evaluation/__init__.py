"""The paper's evaluation protocol (docs/protocol.md): label-efficiency, architecture,
pre-training-size and collapse experiments over fine-tuning runs, their tables,
figures and report.

- `experiments`: what a sweep runs (`Experiment`, run specs, units), its checks and
  its sharding;
- `results`: results tables, experiment folders, locks, resume and merge;
- `runner`: an experiment's data and encoders, and its runs into a results table;
- `summaries`: AUPC and gain tables, the pre-training-size table, their figures;
- `aupc`: the AUPC, its gain and the paired bootstrap;
- `collapse`: covariance spectra of pre-trained encoders (Figure 4, bottom);
- `sweeps`: plan, run (with local parallel shards), merge: what commands call;
- `reproduction`: every sweep of a preset, the spectra and `report.md`;
- `plots`, `report`: the figures and the report.

The label-free collapse metrics themselves live in `keras_ssrl.metrics`, below
training, which logs them during pre-training. Modules are imported by name
(`from keras_ssrl.evaluation.sweeps import run_sweep`): this package imports nothing,
so a sweep's worker process (`python -m keras_ssrl.evaluation.sweeps`) loads only
what it runs.
"""
