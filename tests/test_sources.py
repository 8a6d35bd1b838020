"""Readers of the download formats round-trip what the matching layout writer wrote."""

from __future__ import annotations

import gzip
import os
import re

import h5py
import numpy as np
import pytest

from keras_ssrl.data.errors import DataError
from keras_ssrl.data.layouts import (
    write_archs4,
    write_gdc,
    write_table,
    write_xena,
)
from keras_ssrl.data.sources.archs4 import Archs4Source, open_archs4
from keras_ssrl.data.sources.gdc import GdcSource, open_gdc
from keras_ssrl.data.sources.tables import open_table
from keras_ssrl.data.sources.xena import open_xena

N_SAMPLES, N_GENES = 9, 7


def _parquet_works() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


needs_parquet = pytest.mark.skipif(
    not _parquet_works(), reason="pyarrow cannot be imported with this numpy"
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    counts = rng.poisson(20.0, size=(N_SAMPLES, N_GENES)).astype(np.float64)
    values = np.round(rng.lognormal(1.0, 1.0, size=(N_SAMPLES, N_GENES)), 4)
    genes = [f"ENSG{i + 1:011d}.{i % 3 + 1}" for i in range(N_GENES)]
    symbols = [f"GENE{i}" for i in range(N_GENES)]
    samples = [f"TCGA-AB-{i:04d}-01" for i in range(N_SAMPLES)]
    labels = ["TCGA-LUSC", "TCGA-LUAD", None] * (N_SAMPLES // 3)
    return {
        "counts": counts,
        "values": values,
        "genes": genes,
        "symbols": symbols,
        "samples": samples,
        "labels": labels,
    }


def _all_values(source, block_size=4, order=None):
    out = np.full((source.n_samples, source.n_genes), -1.0)
    seen = []
    for block in source.iter_blocks(block_size, order=order):
        assert np.issubdtype(block.values.dtype, np.floating)
        assert block.values.shape == (len(block.indices), source.n_genes)
        out[block.indices] = block.values
        seen.extend(block.indices.tolist())
    assert sorted(seen) == list(range(source.n_samples))
    return out


def _write(path, text, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return str(path)


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("name", ["expr.csv", "expr.tsv", "expr.csv.gz", "expr.txt"])
@pytest.mark.parametrize("genes_as_rows", [False, True])
def test_table_round_trip_detects_orientation(tmp_path, data, name, genes_as_rows):
    labels = None if genes_as_rows else data["labels"]
    path = write_table(
        tmp_path / name,
        data["values"],
        data["samples"],
        data["genes"],
        labels=labels,
        genes_as_rows=genes_as_rows,
    )
    source = open_table(path, label_column=None if genes_as_rows else "label")
    assert source.sample_ids == data["samples"]
    assert source.genes == data["genes"]
    assert source.labels == labels
    np.testing.assert_array_equal(source.values, data["values"])
    np.testing.assert_array_equal(_all_values(source), data["values"])
    orientation = "genes_as_rows" if genes_as_rows else "samples_as_rows"
    assert source.info == {
        "format": "tsv" if name.endswith(".txt") else name.split(".")[1],
        "orientation": orientation,
        "orientation_detected": True,
    }
    if genes_as_rows:
        assert source.row_name(2) == f"column 4 (sample {data['samples'][2]!r})"
    else:
        assert source.row_name(2) == f"line 4 (sample {data['samples'][2]!r})"


def test_table_explicit_orientation_and_sample_column(tmp_path, data):
    symbols = data["symbols"]  # symbols: nothing to detect from
    path = write_table(
        tmp_path / "e.csv",
        data["values"],
        [f"S{i}" for i in range(N_SAMPLES)],
        symbols,
        labels=data["labels"],
        sample_column="caseID",
        label_column="cancer",
    )
    with pytest.raises(DataError, match="cannot determine the orientation of .*e.csv"):
        open_table(path)
    # Naming the sample column is enough to say that samples are rows.
    source = open_table(path, sample_column="caseID", label_column="cancer")
    assert source.info["orientation"] == "samples_as_rows"
    assert source.info["orientation_detected"] is True
    assert source.genes == symbols
    assert source.labels == data["labels"]
    source = open_table(path, label_column="cancer", genes_as_rows=False)
    assert source.info["orientation_detected"] is False
    assert source.sample_ids == [f"S{i}" for i in range(N_SAMPLES)]
    np.testing.assert_array_equal(source.values, data["values"])
    # The label column is text: read as a gene it is reported as not a number.
    with pytest.raises(DataError, match=r"line 2 \(sample 'S0'\), gene 'cancer'"):
        open_table(path, genes_as_rows=False)


def test_table_sample_column_not_first(tmp_path, data):
    text = "gene_a,caseID,gene_b,cancer\n1,S1,2,A\n3,S2,4,\n"
    path = _write(tmp_path / "t.csv", text)
    source = open_table(path, sample_column="caseID", label_column="cancer")
    assert source.sample_ids == ["S1", "S2"]
    assert source.genes == ["gene_a", "gene_b"]
    assert source.labels == ["A", None]
    np.testing.assert_array_equal(source.values, [[1, 2], [3, 4]])
    assert source.info["orientation"] == "samples_as_rows"


def test_table_missing_values_become_nan(tmp_path):
    text = "id,ENSG00000000001,ENSG00000000002\nS1,,NA\nS2,NaN,2.5\nS3,1e3\n"
    source = open_table(_write(tmp_path / "m.csv", text))
    np.testing.assert_array_equal(
        source.values, [[np.nan, np.nan], [np.nan, 2.5], [1000.0, np.nan]]
    )


def test_table_keeps_ids_as_written(tmp_path):
    # Leading zeros, duplicates, a sample called "NA": nothing is converted or dropped.
    text = "id\tENSG00000000001.1\tENSG00000000001.1\n007\t1\t2\nNA\t3\t4\n007\t5\t6\n"
    source = open_table(_write(tmp_path / "ids.tsv", text))
    assert source.sample_ids == ["007", "NA", "007"]
    assert source.genes == ["ENSG00000000001.1", "ENSG00000000001.1"]


def test_table_r_style_header_and_trailing_delimiter(tmp_path):
    r_style = '"S1","S2"\n"ENSG00000000001",1,2\n"ENSG00000000002",3,4\n'
    source = open_table(_write(tmp_path / "r.csv", r_style))
    assert source.info["orientation"] == "genes_as_rows"
    assert source.sample_ids == ["S1", "S2"]
    np.testing.assert_array_equal(source.values, [[1, 3], [2, 4]])
    trailing = "id,ENSG00000000001,ENSG00000000002,\nS1,1,2,\nS2,3,4,\n"
    source = open_table(_write(tmp_path / "t.csv", trailing))
    assert source.genes == ["ENSG00000000001", "ENSG00000000002"]
    np.testing.assert_array_equal(source.values, [[1, 2], [3, 4]])


def test_table_detects_sample_ids_in_header(tmp_path):
    text = "sample\tGSM1\tGSM2\tGSM3\nTP53\t1\t2\t3\nEGFR\t4\t5\t6\n"
    source = open_table(_write(tmp_path / "sym.tsv", text))
    assert source.info["orientation"] == "genes_as_rows"
    assert source.genes == ["TP53", "EGFR"]


@pytest.mark.parametrize("genes_as_rows", [False, True])
def test_table_non_numeric_cell_names_line_sample_and_gene(tmp_path, genes_as_rows):
    samples = [f"S{i}" for i in range(8)]
    genes = [f"ENSG{i:011d}" for i in range(5)]
    values = np.arange(40, dtype=float).reshape(8, 5)
    path = write_table(
        tmp_path / "expr.csv", values, samples, genes, genes_as_rows=genes_as_rows
    )
    lines = open(path).read().splitlines()
    # Corrupt sample S5, gene index 3.
    if genes_as_rows:
        row, col = 3 + 1, 5 + 1  # line 5 (gene 3), file column 7 (sample S5)
    else:
        row, col = 5 + 1, 3 + 1  # line 7 (sample S5), file column 5 (gene 3)
    cells = lines[row].split(",")
    cells[col] = "abc"
    lines[row] = ",".join(cells)
    _write(path, "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        open_table(path)
    message = str(err.value)
    assert "expr.csv" in message
    assert f"line {row + 1}" in message
    assert "'S5'" in message
    assert f"'{genes[3]}'" in message
    assert "'abc'" in message and "not a number" in message


def test_table_non_numeric_underscore_is_rejected(tmp_path):
    text = "id,ENSG00000000001\nS1,1\nS2,1_000\n"
    with pytest.raises(DataError, match=r"m.csv line 3 \(sample 'S2'\).*'1_000'"):
        open_table(_write(tmp_path / "m.csv", text))


@pytest.mark.parametrize(
    "text, genes_as_rows, message",
    [
        ("", None, "x.csv is empty"),
        ("\n\n", None, "x.csv is empty"),
        ("id,ENSG00000000001\n", None, "x.csv: no samples"),
        ("gene,S1\n", True, "x.csv: no genes"),
        ("id\nS1\nS2\n", None, "x.csv: only one column .*no gene or sample columns"),
        ("id\nS1\nS2\n", False, "x.csv: no gene columns"),
        ("gene\nENSG00000000001\n", True, "x.csv: no sample columns"),
        (
            "id,a,b\nS1,1,2\n",
            None,
            "cannot determine the orientation of .*x.csv: pass ",
        ),
        (
            "ENSG00000000001,ENSG00000000002\nENSG00000000003,1,2\n",
            None,
            "cannot determine the orientation",
        ),
        (
            "id,ENSG00000000001\nS1,1\nS2,1,2\n",
            None,
            "x.csv: .*Expected 2 fields in line 3",
        ),
    ],
)
def test_table_errors(tmp_path, text, genes_as_rows, message):
    path = _write(tmp_path / "x.csv", text)
    with pytest.raises(DataError, match=message):
        open_table(path, genes_as_rows=genes_as_rows)


def test_table_argument_errors(tmp_path, data):
    path = write_table(
        tmp_path / "a.csv", data["values"], data["samples"], data["genes"]
    )
    with pytest.raises(DataError, match="label_column 'tissue' is not a header"):
        open_table(path, label_column="tissue")
    with pytest.raises(DataError, match="sample_column 'caseID' is not a header"):
        open_table(path, sample_column="caseID")
    with pytest.raises(DataError, match="label_column 'sample_id' makes no sense"):
        open_table(path, label_column="sample_id", genes_as_rows=True)
    with pytest.raises(DataError, match="cannot tell the format of .*a.dat"):
        open_table(str(tmp_path / "a.dat"))
    with pytest.raises(DataError, match="unknown table format"):
        open_table(path, fmt="xlsx")
    with pytest.raises(DataError, match="no such file"):
        open_table(str(tmp_path / "missing.csv"))


def test_table_not_utf8(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("id,ENSG00000000001\nS\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.csv"):
        open_table(str(path))


@needs_parquet
@pytest.mark.parametrize("genes_as_rows", [False, True])
def test_parquet_round_trip(tmp_path, data, genes_as_rows):
    labels = None if genes_as_rows else data["labels"]
    values = data["values"].copy()
    values[1, 2] = np.nan
    path = write_table(
        tmp_path / "expr.parquet",
        values,
        data["samples"],
        data["genes"],
        labels=labels,
        genes_as_rows=genes_as_rows,
        sample_column="caseID",
    )
    source = open_table(path, label_column=None if genes_as_rows else "label")
    assert source.sample_ids == data["samples"]
    assert source.genes == data["genes"]
    assert source.labels == labels
    np.testing.assert_array_equal(_all_values(source, 2), values)
    assert source.info["format"] == "parquet"
    expected = "genes_as_rows" if genes_as_rows else "samples_as_rows"
    assert source.info["orientation"] == expected
    if not genes_as_rows:
        assert source.row_name(0).startswith("row 1 (sample")


@needs_parquet
def test_parquet_pandas_index_and_string_cells(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {"ENSG00000000001": [1.0, 2.0], "ENSG00000000002": ["3", "x"]},
        index=pd.Index(["S1", "S2"], name="caseID"),
    )
    path = str(tmp_path / "authors.parquet")
    frame.to_parquet(path)
    with pytest.raises(DataError) as err:
        open_table(path, sample_column="caseID")
    message = str(err.value)
    assert "authors.parquet row 2 (sample 'S2'), gene 'ENSG00000000002'" in message
    frame.loc["S2", "ENSG00000000002"] = "NA"
    frame.to_parquet(path)
    source = open_table(path)
    assert source.sample_ids == ["S1", "S2"]
    np.testing.assert_array_equal(source.values, [[1, 3], [2, np.nan]])


# ------------------------------------------------------------------------------- xena


@pytest.mark.parametrize("name", ["tcga_RSEM_gene_tpm.gz", "matrix.tsv"])
def test_xena_round_trip(tmp_path, data, name):
    values = data["values"].copy()
    values[0, 1] = np.nan
    path = write_xena(tmp_path / name, values, data["samples"], data["genes"])
    with open(path, "rb") as handle:
        head = handle.read(2)
    assert (head == b"\x1f\x8b") == name.endswith(".gz")
    source = open_xena(path)
    assert source.sample_ids == data["samples"]
    assert source.genes == data["genes"]
    assert source.labels is None
    assert source.info == {"format": "xena"}
    np.testing.assert_array_equal(_all_values(source, 3, order=[2, 0, 1]), values)


def test_xena_symbols_and_na(tmp_path):
    text = (
        "sample\tTCGA-OR-A5J1-01\tTCGA-OR-A5J2-01\nTP53\tNA\t1.5\n?|100130426\t0\tNA\n"
    )
    source = open_xena(_write(tmp_path / "pancan.xena", text))
    assert source.genes == ["TP53", "?|100130426"]
    np.testing.assert_array_equal(source.values, [[np.nan, 0.0], [1.5, np.nan]])


def test_xena_non_numeric_cell(tmp_path):
    text = "sample\tTCGA-A-01\tTCGA-B-01\nTP53\t1\t2\nEGFR\t3\tfoo\n"
    with pytest.raises(DataError) as err:
        open_xena(_write(tmp_path / "x.tsv", text))
    message = str(err.value)
    assert "x.tsv line 3 (gene 'EGFR'), column 3 (sample 'TCGA-B-01')" in message
    assert "'foo'" in message


# ------------------------------------------------------------------------------ archs4


@pytest.mark.parametrize("layout", ["v2", "v1", "transposed"])
def test_archs4_round_trip(tmp_path, data, layout):
    samples = [f"GSM{100 + i}" for i in range(N_SAMPLES)]
    genes = data["genes"] if layout == "v2" else data["symbols"]
    path = write_archs4(
        tmp_path / "human.h5",
        data["counts"],
        samples,
        genes,
        symbols=data["symbols"] if layout == "v2" else None,
        layout=layout,
    )
    source = open_archs4(path)
    assert isinstance(source, Archs4Source)
    assert source.sample_ids == samples
    assert source.genes == genes
    assert source.labels is None
    assert source.info["format"] == "archs4"
    assert source.info["layout"] == layout
    assert source.info["gene_id"] == ("ensembl" if layout == "v2" else "symbol")
    shape = [N_SAMPLES, N_GENES] if layout == "transposed" else [N_GENES, N_SAMPLES]
    assert source.info["shape"] == shape
    np.testing.assert_array_equal(_all_values(source, 4), data["counts"])
    assert "GSM102" in source.row_name(2)


def test_archs4_gene_id_choices(tmp_path, data):
    samples = [f"GSM{i}" for i in range(N_SAMPLES)]
    path = write_archs4(
        tmp_path / "h.h5",
        data["counts"],
        samples,
        data["genes"],
        symbols=data["symbols"],
    )
    assert open_archs4(path, gene_id="ensembl").genes == data["genes"]
    symbol = open_archs4(path, gene_id="symbol")
    assert symbol.genes == data["symbols"]
    assert symbol.info["gene_id"] == "symbol"
    # Some v2.x files name the datasets gene_symbol / ensembl_gene_id.
    with h5py.File(path, "a") as handle:
        handle.move("meta/genes/symbol", "meta/genes/gene_symbol")
        handle.move("meta/genes/ensembl_gene", "meta/genes/ensembl_gene_id")
    assert open_archs4(path).genes == data["genes"]
    assert open_archs4(path, gene_id="symbol").genes == data["symbols"]
    with h5py.File(path, "a") as handle:
        del handle["meta/genes/ensembl_gene_id"]
    auto = open_archs4(path)
    assert auto.genes == data["symbols"] and auto.info["gene_id"] == "symbol"
    with pytest.raises(DataError, match="no gene identifiers for gene id 'ensembl'"):
        open_archs4(path, gene_id="ensembl")
    with pytest.raises(DataError, match="unknown gene id"):
        open_archs4(path, gene_id="entrez")


def test_archs4_decodes_variable_length_utf8(tmp_path, data):
    samples = [f"GSM{i}" for i in range(N_SAMPLES)]
    path = write_archs4(tmp_path / "h.h5", data["counts"], samples, data["genes"])
    symbols = [f"Gène-{i}" for i in range(N_GENES)]
    with h5py.File(path, "a") as handle:
        del handle["meta/genes/symbol"]
        handle.create_dataset(
            "meta/genes/symbol", data=symbols, dtype=h5py.string_dtype("utf-8")
        )
    assert open_archs4(path, gene_id="symbol").genes == symbols


def test_archs4_streams_blocks_in_order(tmp_path, data):
    samples = [f"GSM{i}" for i in range(N_SAMPLES)]
    path = write_archs4(tmp_path / "h.h5", data["counts"], samples, data["genes"])
    source = open_archs4(path)
    blocks = list(source.iter_blocks(4, order=[2, 0, 1]))
    assert [b.indices.tolist() for b in blocks] == [[8], [0, 1, 2, 3], [4, 5, 6, 7]]
    for block in blocks:
        np.testing.assert_array_equal(block.values, data["counts"][block.indices])
    # The file is closed between iterations: it can be reopened for writing.
    with h5py.File(path, "a"):
        pass


def test_archs4_labels_and_metadata(tmp_path, data):
    samples = [f"GSM{i}" for i in range(N_SAMPLES)]
    tissues = ["liver", "lung", ""] * (N_SAMPLES // 3)
    probability = [0.1 * i for i in range(N_SAMPLES)]
    path = write_archs4(
        tmp_path / "h.h5",
        data["counts"],
        samples,
        data["genes"],
        sample_meta={
            "source_name_ch1": tissues,
            "characteristics_ch1": ["tissue: liver"] * N_SAMPLES,
            "singlecellprobability": probability,
        },
    )
    source = open_archs4(path, label_field="source_name_ch1")
    assert source.labels == ["liver", "lung", None] * (N_SAMPLES // 3)
    meta = source.sample_metadata(
        ["source_name_ch1", "title", "series_id", "singlecellprobability"]
    )
    assert meta["source_name_ch1"] == tissues
    assert meta["title"][0] == "sample GSM0"
    assert meta["series_id"] == ["GSE1000"] * N_SAMPLES
    np.testing.assert_allclose(meta["singlecellprobability"], probability)
    with pytest.raises(DataError, match="no sample field meta/samples/tissue"):
        source.sample_metadata(["tissue"])
    with pytest.raises(DataError, match="no label field meta/samples/tissue"):
        open_archs4(path, label_field="tissue")


def test_archs4_singlecellprobability_stored_as_text(tmp_path, data):
    samples = [f"GSM{i}" for i in range(N_SAMPLES)]
    text = ["0.25"] * (N_SAMPLES - 1) + ["n/a"]
    path = write_archs4(
        tmp_path / "h.h5",
        data["counts"],
        samples,
        data["genes"],
        sample_meta={"singlecellprobability": text},
    )
    meta = open_archs4(path).sample_metadata(["singlecellprobability"])
    assert meta["singlecellprobability"][0] == 0.25
    assert np.isnan(meta["singlecellprobability"][-1])


def test_archs4_orientation_errors(tmp_path, data):
    samples = [f"GSM{i}" for i in range(N_SAMPLES)]
    path = write_archs4(tmp_path / "bad.h5", data["counts"], samples, data["genes"])
    with h5py.File(path, "a") as handle:
        del handle["meta/genes/ensembl_gene"]
        handle["meta/genes/ensembl_gene"] = np.array([b"ENSG1"] * (N_GENES + 1))
    with pytest.raises(DataError) as err:
        open_archs4(path)
    message = str(err.value)
    assert "bad.h5" in message and "neither axis matches" in message
    assert f"({N_GENES}, {N_SAMPLES})" in message and f"{N_GENES + 1} genes" in message

    square = np.ones((N_GENES, N_GENES))
    path = write_archs4(
        tmp_path / "square.h5",
        square,
        [f"GSM{i}" for i in range(N_GENES)],
        data["genes"],
    )
    with pytest.raises(DataError) as err:
        open_archs4(path)
    message = str(err.value)
    assert "square.h5" in message and "ambiguous" in message
    assert f"({N_GENES}, {N_GENES})" in message


def test_archs4_file_errors(tmp_path, data):
    not_h5 = _write(tmp_path / "x.h5", "hello")
    with pytest.raises(DataError, match="x.h5: cannot open as HDF5"):
        open_archs4(not_h5)
    path = str(tmp_path / "empty.h5")
    with h5py.File(path, "w") as handle:
        handle.create_group("meta")
    with pytest.raises(DataError, match="no data/expression dataset"):
        open_archs4(path)
    samples = [f"GSM{i}" for i in range(N_SAMPLES - 1)] + ["GSM_extra", "GSM_more"]
    path = write_archs4(
        tmp_path / "ids.h5", data["counts"], samples[:N_SAMPLES], data["genes"]
    )
    with h5py.File(path, "a") as handle:
        del handle["meta/samples/geo_accession"]
        handle["meta/samples/geo_accession"] = np.array([s.encode() for s in samples])
    with pytest.raises(DataError, match=f"{N_SAMPLES} samples, but .* {N_SAMPLES + 1}"):
        open_archs4(path)


# --------------------------------------------------------------------------------- gdc


def _gdc(tmp_path, data, **kwargs):
    folder = tmp_path / "gdc_download"
    write_gdc(
        folder,
        data["counts"],
        data["samples"],
        data["genes"],
        data["labels"],
        symbols=data["symbols"],
        **kwargs,
    )
    return str(folder)


def test_gdc_round_trip(tmp_path, data):
    folder = _gdc(tmp_path, data)
    source = open_gdc(folder)
    assert isinstance(source, GdcSource)
    assert source.sample_ids == data["samples"]
    assert source.labels == data["labels"]
    # Summary rows dropped; _PAR_Y rows kept as written, right after their gene.
    g = data["genes"]
    assert source.genes == [g[0], g[0] + "_PAR_Y", g[1], g[1] + "_PAR_Y", *g[2:]]
    assert not any(gene.startswith("N_") for gene in source.genes)
    assert source.info == {
        "format": "gdc",
        "gene_model": "GENCODE v36",
        "column": "unstranded",
        "sample_sheet": "gdc_sample_sheet.2026-01-01.tsv",
        "files_not_in_sheet": 0,
    }
    values = _all_values(source, 4, order=[1, 2, 0])
    real = [i for i, gene in enumerate(source.genes) if not gene.endswith("_PAR_Y")]
    np.testing.assert_array_equal(values[:, real], data["counts"])
    assert not values[:, [1, 3]].any()
    assert re.match(
        r"sample 'TCGA-AB-0000-01' \(file .*augmented_star", source.row_name(0)
    )


def test_gdc_file_layout_is_faithful(tmp_path, data):
    folder = _gdc(tmp_path, data)
    file_ids = sorted(d for d in os.listdir(folder) if os.path.isdir(f"{folder}/{d}"))
    assert len(file_ids) == N_SAMPLES
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-\w{12}", file_ids[0]
    )
    (name,) = os.listdir(f"{folder}/{file_ids[0]}")
    assert name.endswith(".rna_seq.augmented_star_gene_counts.tsv")
    lines = open(f"{folder}/{file_ids[0]}/{name}").read().splitlines()
    assert lines[0] == "# gene-model: GENCODE v36"
    assert lines[1].split("\t")[3:6] == [
        "unstranded",
        "stranded_first",
        "stranded_second",
    ]
    assert [line.split("\t")[0] for line in lines[2:6]] == [
        "N_unmapped",
        "N_multimapping",
        "N_noFeature",
        "N_ambiguous",
    ]
    # Deterministic: the same call writes the same folder names.
    again = _gdc(tmp_path / "again", data)
    assert sorted(os.listdir(again)) == sorted(os.listdir(folder))


def test_gdc_tpm_column_and_extra_files(tmp_path, data):
    folder = _gdc(tmp_path, data)
    extra = os.path.join(folder, "unlisted")
    os.makedirs(extra)
    _write(os.path.join(extra, "x.rna_seq.augmented_star_gene_counts.tsv"), "# x\n")
    source = open_gdc(folder, column="tpm_unstranded", label_column=None)
    assert source.labels is None
    assert source.info["files_not_in_sheet"] == 1
    assert source.info["column"] == "tpm_unstranded"
    values = _all_values(source)
    np.testing.assert_allclose(values.sum(axis=1), 1e6, rtol=1e-4)


def test_gdc_missing_file(tmp_path, data):
    folder = _gdc(tmp_path, data)
    sheet = os.path.join(folder, "gdc_sample_sheet.2026-01-01.tsv")
    row = open(sheet).read().splitlines()[3].split("\t")
    os.remove(os.path.join(folder, row[0], row[1]))
    with pytest.raises(DataError) as err:
        open_gdc(folder)
    message = str(err.value)
    assert "gdc_sample_sheet.2026-01-01.tsv line 4" in message
    assert f"{row[0]}/{row[1]}" in message and row[6] in message


def test_gdc_mismatched_gene_list(tmp_path, data):
    folder = _gdc(tmp_path, data)
    sheet = os.path.join(folder, "gdc_sample_sheet.2026-01-01.tsv")
    row = open(sheet).read().splitlines()[5].split("\t")
    target = os.path.join(folder, row[0], row[1])
    lines = open(target).read().splitlines()
    lines[10] = lines[10].replace(data["genes"][2], "ENSG99999999999.1")
    _write(target, "\n".join(lines) + "\n")
    source = open_gdc(folder)  # only the first file is read when opening
    with pytest.raises(DataError) as err:
        _all_values(source)
    message = str(err.value)
    assert row[1] in message and "line 11" in message
    assert "'ENSG99999999999.1'" in message and repr(data["genes"][2]) in message
    # A truncated file is reported too.
    _write(target, "\n".join(lines[:8]) + "\n")
    with pytest.raises(DataError, match="ends after 2 genes"):
        _all_values(source)


def test_gdc_non_numeric_value(tmp_path, data):
    folder = _gdc(tmp_path, data)
    sheet = os.path.join(folder, "gdc_sample_sheet.2026-01-01.tsv")
    row = open(sheet).read().splitlines()[1].split("\t")
    target = os.path.join(folder, row[0], row[1])
    lines = open(target).read().splitlines()
    cells = lines[10].split("\t")
    cells[3] = "many"
    lines[10] = "\t".join(cells)
    _write(target, "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        open_gdc(folder)
    message = str(err.value)
    assert row[1] in message and "line 11" in message and "'many'" in message
    assert repr(cells[0]) in message


def test_gdc_sample_sheet_errors(tmp_path, data):
    folder = _gdc(tmp_path, data)
    sheet = os.path.join(folder, "gdc_sample_sheet.2026-01-01.tsv")
    os.rename(sheet, os.path.join(tmp_path, "sheet.tsv"))
    with pytest.raises(DataError, match="found no sample sheets"):
        open_gdc(folder)
    source = open_gdc(folder, sample_sheet=os.path.join(tmp_path, "sheet.tsv"))
    assert source.n_samples == N_SAMPLES
    for name in ("gdc_sample_sheet.a.tsv", "gdc_sample_sheet.b.tsv"):
        _write(os.path.join(folder, name), "File ID\n")
    with pytest.raises(DataError, match="found 2 sample sheets"):
        open_gdc(folder)
    with pytest.raises(DataError, match="no column 'File Name', 'Sample ID'"):
        open_gdc(folder, sample_sheet=os.path.join(folder, "gdc_sample_sheet.a.tsv"))
    with pytest.raises(DataError, match="unknown GDC value column"):
        open_gdc(folder, column="counts")
