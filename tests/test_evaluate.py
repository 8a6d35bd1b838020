"""The evaluation protocol: AUPC, bootstrap, sweeps, resume, shards, figures, report."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest

from keras_ssrl.evaluation import experiments, results, runner
from keras_ssrl.evaluation.aupc import aupc, aupc_gain, paired_bootstrap_gain
from keras_ssrl.evaluation.report import write_report
from tests.conftest import load_script

FAST = ["--max-epochs", "1", "--patience", "1", "--repeats", "1"]


@pytest.fixture(scope="module")
def cli():
    return load_script("scripts/evaluate.py")


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- AUPC


def test_aupc_and_gain_against_hand_computed_values():
    p = [0.02, 0.1, 0.3, 0.5]  # 0.5 lies outside [0.02, 0.3] and is ignored
    a = [0.5, 0.7, 0.9, 1.0]
    # Trapezoids: 0.08 * (0.5 + 0.7) / 2 + 0.2 * (0.7 + 0.9) / 2 = 0.048 + 0.16
    assert aupc(p, a) == pytest.approx(0.208)
    assert aupc(p, a) / 0.28 == pytest.approx(0.742857, rel=1e-5)
    b = [0.4, 0.6, 0.9, 1.0]
    # Differences 0.1, 0.1, 0: 0.08 * 0.1 + 0.2 * 0.05 = 0.018
    assert aupc_gain(p, a, b) == pytest.approx(0.018)
    assert aupc(p[::-1], a[::-1]) == pytest.approx(0.208)  # order does not matter
    with pytest.raises(ValueError, match="at least two"):
        aupc([0.5, 1.0], [0.1, 0.2])


def test_paired_bootstrap_interval_covers_the_true_gain():
    """On synthetic curves with a known gain, the 95% interval covers it ~95% of
    the time (at least 85% over 200 simulated experiments)."""
    rng = np.random.default_rng(0)
    p = np.array([0.02, 0.05, 0.1, 0.2, 0.3])
    base = 0.4 + 0.5 * np.sqrt(p)
    true_gain = aupc(p, base + 0.03) - aupc(p, base)
    covered = 0
    for trial in range(200):
        shared = rng.normal(0, 0.03, size=(len(p), 5))  # subset effect, paired
        a1 = base[:, None] + 0.03 + shared + rng.normal(0, 0.02, size=(len(p), 5))
        a2 = base[:, None] + shared + rng.normal(0, 0.02, size=(len(p), 5))
        stats = paired_bootstrap_gain(p, a1, a2, n_boot=500, seed=trial)
        assert stats["ci_low"] <= stats["gain"] <= stats["ci_high"]
        covered += stats["ci_low"] <= true_gain <= stats["ci_high"]
    assert covered / 200 >= 0.85, covered
    one = paired_bootstrap_gain(p, a1[:, :1], a2[:, :1])
    assert np.isnan(one["ci_low"]) and one["repeats"] == 1


# ------------------------------------------------------------------------- planning


def test_every_run_belongs_to_exactly_one_shard():
    experiment = experiments.Experiment(
        kind="architectures",
        methods=("baseline", "scarf", "byol"),
        fractions=(0.02, 0.1, 0.3),
        repeats=2,
        depths=(2, 3),
        widths=(8, 16),
    )
    units = experiments.build_units(experiment)
    every = [r.key for u in units for r in u.runs]
    assert len(every) == len(set(every)) == 2 * 2 * 3 * 3 * 2
    for n in (1, 2, 3, 5):
        seen = [
            r.key
            for i in range(1, n + 1)
            for u in experiments.shard_units(units, (i, n))
            for r in u.runs
        ]
        assert sorted(seen) == sorted(every)
        loads = [
            sum(experiments.unit_cost(u) for u in experiments.shard_units(units, (i, n)))
            for i in range(1, n + 1)
        ]  # balanced: no shard exceeds another by more than one unit
        assert max(loads) - min(loads) <= max(experiments.unit_cost(u) for u in units)
    # A unit keeps a pre-trained encoder's runs together (pre-trained once).
    scarf = [u for u in units if u.pretrain and u.pretrain.method == "scarf"]
    assert len(scarf) == 4 and all(len(u.runs) == 6 for u in scarf)
    with pytest.raises(experiments.ProtocolError, match="i/n"):
        experiments.parse_shard("2")
    with pytest.raises(experiments.ProtocolError, match="between"):
        experiments.parse_shard("3/2")


def test_presets_hold_the_grids_of_each_reproduction():
    """The registry gives the sweeps the grids reproduce.py has always run."""
    from keras_ssrl.config import (
        FULL_FRACTIONS,
        FULL_PRETRAIN_SIZES,
        PRESETS,
        QUICK_FRACTIONS,
        reproduction_plan,
    )

    def grids(preset):
        return {s.kind: (s.folder, s.fractions, s.repeats, s.depths, s.widths,
                         s.pretrain_sizes) for s in reproduction_plan(preset)}  # fmt: skip

    quick_aupc = (0.02, 0.05, 0.1, 0.2, 0.3)
    assert grids("quick") == {
        "label-efficiency": ("label-efficiency", QUICK_FRACTIONS, 3, (4,), (256,), (1.0,)),
        "architectures": ("architectures", quick_aupc, 3, (2, 4, 6), (256,), (1.0,)),
        "pretrain-size": ("pretrain-size", (0.1,), 3, (4,), (256,), (0.05, 0.2, 1.0)),
    }  # fmt: skip
    paper = grids("paper")
    assert paper["label-efficiency"][1:3] == (FULL_FRACTIONS, 5)
    assert len(FULL_FRACTIONS) == 99
    assert paper["architectures"][1][0] == 0.02 and paper["architectures"][1][-1] == 0.3
    assert len(paper["architectures"][1]) == 29
    assert paper["architectures"][3:5] == (tuple(range(2, 11)), (256, 1024))
    assert paper["pretrain-size"][5] == FULL_PRETRAIN_SIZES
    assert len(FULL_PRETRAIN_SIZES) == 24
    assert grids("smoke") == {
        "label-efficiency": ("label-efficiency", (0.05, 0.3), 1, (2,), (16,), (1.0,)),
        "architectures": ("architectures", (0.05, 0.3), 1, (1, 2), (16,), (1.0,)),
        "pretrain-size": ("pretrain-size", (0.1,), 1, (2,), (16,), (0.5, 1.0)),
    }  # fmt: skip
    # The command line's named grids are the presets' grids.
    assert experiments.grid_values("quick", "label-efficiency", "fractions", "-") == (
        PRESETS["quick"].fractions
    )
    assert experiments.grid_values("full", "architectures", "fractions", "-") == (
        PRESETS["paper"].architecture_fractions
    )
    listed = experiments.grid_values("0.1,0.3", "architectures", "fractions", "-")
    assert listed == (0.1, 0.3)
    repeats = [experiments.default_repeats(g) for g in ("quick", "full", None)]
    assert repeats == [3, 5, 5]


def test_evaluate_flags_default_to_the_configs(cli, capsys):
    """Settings flags come from flag tables over the configs: no restated default."""
    from keras_ssrl.config import FinetuneConfig, PretrainConfig

    args = cli.parser().parse_args(["label-efficiency", "--pretrain"])
    experiment = cli.experiment_of(args)
    assert experiment.finetune == FinetuneConfig()
    assert experiment.pretrain_epochs == PretrainConfig().epochs
    assert (experiment.depths, experiment.widths) == ((4,), (256,))
    args = cli.parser().parse_args(["logreg", "--seed", "3", "--max-epochs", "7"])
    experiment = cli.experiment_of(args)
    assert experiment.finetune == FinetuneConfig(seed=3, max_epochs=7)
    assert experiment.seed == 3 and experiment.modes == ("unfrozen",)
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["architectures", "--help"])
    assert "epochs at most (default: 100)" in " ".join(capsys.readouterr().out.split())


def test_progress_reports_an_eta():
    stream = io.StringIO()
    progress = runner.Progress(4, "sweep", stream=stream, every=0.0)
    for _ in range(4):
        progress.update("note")
    text = stream.getvalue()
    assert "1/4 runs" in text and "4/4 runs" in text and "ETA" in text


# ---------------------------------------------------------------------- sub-commands


@pytest.fixture(scope="module")
def label_efficiency(cli, labelled_dir, tiny_scarf_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    out = str(root / "label-efficiency")
    args = ["label-efficiency", "--data", labelled_dir,
            "--pretrained", f"scarf={tiny_scarf_run}",
            "--methods", "baseline,scarf,logreg", "--fractions", "0.05,0.3", *FAST]  # fmt: skip
    assert cli.main([*args, "--out", out]) == 0
    return root, out, args


def test_label_efficiency_writes_results_table_and_figure(label_efficiency):
    _, out, _ = label_efficiency
    assert {"experiment.json", "results.csv", "aupc.csv", "label_efficiency.png"} <= set(
        os.listdir(out)
    )
    table = rows(os.path.join(out, "results.csv"))
    assert list(table[0]) == list(results.RESULT_COLUMNS)
    # 2 fractions x (baseline + scarf frozen + scarf unfrozen + logreg), 1 repeat.
    assert len(table) == 8
    combos = {(r["method"], r["mode"]) for r in table}
    assert combos == {("baseline", "none"), ("scarf", "frozen"),
                      ("scarf", "unfrozen"), ("logreg", "none")}  # fmt: skip
    assert {r["architecture"] for r in table} == {"2x16"}  # the pre-trained runs'
    # Paired design: every method of a (p, repeat) saw the same subset.
    for p in ("0.05", "0.3"):
        assert len({(r["seed"], r["n_train"]) for r in table if r["p"] == p}) == 1
    for r in table:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    gains = rows(os.path.join(out, "aupc.csv"))
    by = {(g["method"], g["mode"]): g for g in gains}
    assert by[("baseline", "none")]["gain_vs_baseline"] == ""
    scarf, base = by[("scarf", "unfrozen")], by[("baseline", "none")]
    assert float(scarf["aupc"]) == pytest.approx(
        float(scarf["gain_area_vs_baseline"]) + float(base["aupc"]), abs=1e-5
    )
    # The gain is on aupc_normalised's scale; the 0.05, 0.3 grid is noted as short.
    assert float(scarf["aupc_normalised"]) == pytest.approx(
        float(scarf["gain_vs_baseline"]) + float(base["aupc_normalised"]), abs=1e-5
    )
    assert "[0.02, 0.05] missing" in scarf["note"]
    assert os.path.getsize(os.path.join(out, "label_efficiency.png")) > 10_000


def test_stacked_runs_give_the_one_at_a_time_results(
    cli, label_efficiency, tmp_path, monkeypatch
):
    """--parallel-runs 4 (every kind of run stacked) against one run at a time."""
    from keras_ssrl.finetuning import StackedFinetuner

    _, _, args = label_efficiency
    single, out = str(tmp_path / "single"), str(tmp_path / "stacked")
    assert cli.main([*args, "--out", single, "--parallel-runs", "1"]) == 0
    calls = []
    run_many = StackedFinetuner.run_many

    def counted(self, data, jobs, **kwargs):
        calls.append((self.mode, len(jobs)))
        return run_many(self, data, jobs, **kwargs)

    monkeypatch.setattr(StackedFinetuner, "run_many", counted)
    assert cli.main([*args, "--out", out, "--parallel-runs", "4"]) == 0
    # baseline, scarf frozen, scarf unfrozen: the 2 fractions of each in one model.
    assert sorted(calls) == [("frozen", 2), ("unfrozen", 2), ("unfrozen", 2)]
    stacked = {results.row_key(r): r for r in rows(os.path.join(out, "results.csv"))}
    alone = {results.row_key(r): r for r in rows(os.path.join(single, "results.csv"))}
    assert stacked.keys() == alone.keys()
    for key, row in stacked.items():
        other = alone[key]
        assert (row["seed"], row["n_train"], row["epochs"], row["best_epoch"]) == (
            other["seed"], other["n_train"], other["epochs"], other["best_epoch"]
        ), key
        # Floating-point order differs: at most one test prediction may flip.
        assert float(row["accuracy"]) == pytest.approx(
            float(other["accuracy"]), abs=0.02
        )
    assert cli.main([*args, "--out", str(tmp_path / "x"), "--parallel-runs", "0"]) == 2
    assert not (tmp_path / "x").exists()


def test_rerun_skips_finished_runs(cli, label_efficiency, capsys):
    _, out, args = label_efficiency
    before = rows(os.path.join(out, "results.csv"))
    assert cli.main([*args, "--out", out]) == 0
    assert "8 already done, 0 to run" in capsys.readouterr().out
    assert rows(os.path.join(out, "results.csv")) == before
    # Another experiment in the same folder is refused.
    changed = [a if a != "0.05,0.3" else "0.1,0.3" for a in args]
    assert cli.main([*changed, "--out", out]) == 2
    assert "holds another experiment" in capsys.readouterr().err


def test_shards_merge_into_the_same_results(cli, label_efficiency, tmp_path, capsys):
    _, out, args = label_efficiency
    sharded = str(tmp_path / "sharded")
    assert cli.main([*args, "--out", sharded, "--shard", "1/3"]) == 0
    assert cli.main(["merge", "--out", sharded]) == 3  # shards 2 and 3 missing
    assert "missing" in capsys.readouterr().out
    for shard in ("2/3", "3/3"):
        assert cli.main([*args, "--out", sharded, "--shard", shard]) == 0
    parts = [rows(os.path.join(sharded, f"results.shard-{i}-of-3.csv")) for i in (1, 2, 3)]
    keys = [results.row_key(r) for part in parts for r in part]
    assert len(keys) == len(set(keys)) == 8  # disjoint, complete
    assert cli.main(["merge", "--out", sharded]) == 0
    merged = {results.row_key(r): r for r in rows(os.path.join(sharded, "results.csv"))}
    single = {results.row_key(r): r for r in rows(os.path.join(out, "results.csv"))}
    assert merged.keys() == single.keys()
    for key in single:
        assert merged[key]["accuracy"] == single[key]["accuracy"], key
    assert os.path.exists(os.path.join(sharded, "aupc.csv"))


def test_ssl_methods_need_encoders(cli, labelled_dir, tmp_path, capsys):
    code = cli.main(["label-efficiency", "--data", labelled_dir, "--methods", "vime",
                     "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2
    assert "--pretrained vime=RUN_DIR" in capsys.readouterr().err


def test_other_sweeps_collapse_and_report(cli, labelled_dir, tiny_scarf_run, label_efficiency):
    root, _, _ = label_efficiency
    pretrain_dir = str(root / "pretrain")
    common = ["--data", labelled_dir, "--methods", "baseline,scarf",
              "--pretrain-epochs", "1", "--pretrain-dir", pretrain_dir, *FAST]  # fmt: skip
    out = str(root / "architectures")
    assert cli.main(["architectures", *common, "--depths", "1,2", "--widths", "8",
                     "--fractions", "0.05,0.3", "--out", out]) == 0  # fmt: skip
    table = rows(os.path.join(out, "architectures.csv"))
    assert {(r["architecture"], r["method"]) for r in table} == {
        ("1x8", "baseline"), ("1x8", "scarf"), ("2x8", "baseline"), ("2x8", "scarf")
    }  # fmt: skip
    assert all(r["gain_vs_baseline"] for r in table if r["method"] == "scarf")
    assert os.path.exists(os.path.join(out, "architectures.png"))
    pretrained = sorted(os.listdir(root / "pretrain"))
    assert pretrained == ["scarf-1x8-q1-e1-s0", "scarf-2x8-q1-e1-s0"]

    out = str(root / "pretrain-size")
    assert cli.main(["pretrain-size", *common, "--sizes", "0.5,1", "--layers", "1",
                     "--width", "8", "--out", out]) == 0  # fmt: skip
    table = rows(os.path.join(out, "pretrain_size.csv"))
    assert {(r["method"], r["q"]) for r in table} == {
        ("baseline", "1"), ("scarf", "0.5"), ("scarf", "1")
    }  # fmt: skip
    assert {r["p"] for r in table} == {"0.1"}
    assert os.path.exists(os.path.join(out, "pretrain_size.png"))
    # q = 1 at 1 x 8 was pre-trained by the architecture sweep: shared, not redone.
    assert "scarf-1x8-q0.5-e1-s0" in os.listdir(root / "pretrain")

    out = str(root / "collapse")
    assert cli.main(["collapse", "--runs", f"scarf={tiny_scarf_run}", "--out", out]) == 0
    table = rows(os.path.join(out, "collapse.csv"))
    assert [r["run"] for r in table] == ["scarf", "random-init"]
    assert {"effective_rank", "collapsed_dims", "embedding_std"} <= set(table[0])
    spectrum = rows(os.path.join(out, "spectrum.csv"))
    assert len(spectrum) == 2 * 16  # 16 singular values per encoder
    assert os.path.exists(os.path.join(out, "collapse.png"))
    # --from finds every finished run under a folder (here the sweeps' encoders).
    found = str(root / "collapse-found")
    assert cli.main(["collapse", "--from", pretrain_dir, "--data", labelled_dir,
                     "--out", found]) == 0  # fmt: skip
    names = [r["run"] for r in rows(os.path.join(found, "collapse.csv"))]
    assert names == [*sorted(os.listdir(pretrain_dir)), "random-init"]

    report = open(write_report(str(root), preset="test", setting="custom")).read()
    assert "_missing" not in report
    for figure in ("label_efficiency.png", "architectures.png", "collapse.png",
                   "pretrain_size.png"):  # fmt: skip
        assert figure in report
    assert "| scarf | unfrozen |" in report
    assert f"`{labelled_dir}`: pretrain " in report and ", test " in report


def test_logreg_subcommand(cli, labelled_dir, tmp_path):
    out = str(tmp_path / "logreg")
    assert cli.main(["logreg", "--data", labelled_dir, "--fractions", "0.05,0.3",
                     "--repeats", "2", "--out", out]) == 0  # fmt: skip
    table = rows(os.path.join(out, "results.csv"))
    assert {r["method"] for r in table} == {"logreg"} and len(table) == 4
    assert len({r["seed"] for r in table}) == 4  # repeats and fractions differ


def test_transfer_setting_aligns_both_datasets_on_common_genes(labelled_dir, tmp_path):
    from keras_ssrl.config import ConversionConfig
    from keras_ssrl.data.builtin import builtin_source
    from keras_ssrl.data.convert import convert
    from keras_ssrl.data.manifest import Manifest

    archs4 = str(tmp_path / "archs4")
    source = builtin_source("synthetic-archs4", n_samples=400, n_genes=120)
    convert(source, archs4, ConversionConfig(shards=1), log=lambda _: None)
    pre, fine = runner.align_pair(archs4, labelled_dir, str(tmp_path / "cache"), log=print)
    a, b = Manifest.load(pre), Manifest.load(fine)
    assert a.genes == b.genes  # same genes, same order
    common = set(Manifest.load(archs4).genes) & set(Manifest.load(labelled_dir).genes)
    assert set(a.genes) == common and 0 < len(common) < 120
    # Each keeps its own samples and labels; written once, reused.
    assert a.num_records("pretrain") == Manifest.load(archs4).num_records("pretrain")
    assert b.labels == Manifest.load(labelled_dir).labels
    again = runner.align_pair(archs4, labelled_dir, str(tmp_path / "cache"), log=print)
    assert again == (pre, fine)


def test_jobs_run_shards_in_parallel_and_merge(cli, labelled_dir, tmp_path, capfd):
    out = str(tmp_path / "jobs")
    args = ["label-efficiency", "--data", labelled_dir, "--methods", "baseline,logreg",
            "--fractions", "0.05,0.3", *FAST, "--out", out]  # fmt: skip
    assert cli.main([*args, "--jobs", "2"]) == 0
    names = set(os.listdir(out))
    assert {"results.shard-1-of-2.csv", "results.shard-2-of-2.csv"} <= names
    assert {"results.csv", "aupc.csv", "label_efficiency.png"} <= names
    assert len(rows(os.path.join(out, "results.csv"))) == 4
    assert "when all are" not in capfd.readouterr().out  # the parent merged


def test_reproduce_runs_every_experiment_and_writes_the_report(labelled_dir, tmp_path):
    """The whole pipeline end to end on tiny data (the smoke preset, 1 epoch)."""
    reproduce = load_script("scripts/reproduce.py")
    out = str(tmp_path / "reproduce")
    code = reproduce.main(["--data", labelled_dir, "--preset", "smoke", "--out", out,
                           "--pretrain-epochs", "1", "--max-epochs", "1",
                           "--jobs", "1"])  # fmt: skip
    assert code == 0
    for experiment, table in (("label-efficiency", "aupc.csv"),
                              ("architectures", "architectures.csv"),
                              ("pretrain-size", "pretrain_size.csv"),
                              ("collapse", "collapse.csv")):  # fmt: skip
        assert os.path.exists(os.path.join(out, experiment, table)), experiment
    report = open(os.path.join(out, "report.md")).read()
    assert "_missing" not in report
    # The smoke preset has one repeat: no interval, so no findings are claimed.
    assert "one repeat per fraction gives no interval" in report
    assert "Here:" not in report and "better than the baseline" not in report
    assert "Samples per split" in report and "[0.02, 0.05] missing" in report
    # Encoders are shared between experiments: the 2 x 16 ones of label-efficiency
    # serve pretrain-size's q = 1 and the architecture sweep's depth 2.
    runs = os.listdir(os.path.join(out, "pretrain"))
    assert sorted(r for r in runs if r.startswith("scarf-")) == [
        "scarf-1x16-q1-e1-s0", "scarf-2x16-q0.5-e1-s0", "scarf-2x16-q1-e1-s0",
    ]  # fmt: skip
    collapse = rows(os.path.join(out, "collapse", "collapse.csv"))
    assert [r["run"] for r in collapse] == ["scarf", "vime", "byol", "random-init"]
