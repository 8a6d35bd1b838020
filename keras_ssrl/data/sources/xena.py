"""UCSC Xena expression matrices (TOIL and PanCanAtlas hubs).

Layout handled: a tab-separated matrix, possibly gzip-compressed (downloads such as
`tcga_RSEM_gene_tpm.gz` have no `.tsv` extension; compression is recognised from the
file's first bytes). Genes are rows and samples are columns: the first header cell is
`sample`, the other header cells are sample barcodes (`TCGA-OR-A5J1-01`), and the first
column holds gene ids (versioned Ensembl ids on the TOIL hub, HUGO symbols on the
PanCanAtlas hub). `NA` cells become NaN.

Values are usually already log-transformed (log2(x + 1) or log2(TPM + 0.001)): the
caller says so to the conversion. Labels live in a separate phenotype file that the
caller joins on sample id.
"""

from __future__ import annotations

import os

from keras_ssrl.data.sources.memory import ArraySource
from keras_ssrl.data.sources.tables import open_table


def open_xena(path: str) -> ArraySource:
    """Reads a UCSC Xena genes x samples matrix.

    Args:
        path: str, the matrix file (plain or gzip-compressed TSV).

    Returns:
        An `ArraySource` of shape `(samples, genes)`, float64 values (NaN for `NA`);
        `row_name` names a sample by its file column.

    Raises:
        DataError: the file is empty, has no sample columns or no genes, or a cell is
            not a number (the message names the line, gene and sample).

    Example:

    ```python
    source = open_xena("tcga_RSEM_gene_tpm.gz")
    ```
    """
    # The Xena layout is a genes-as-rows TSV: one parser for all tables keeps error
    # messages and missing-value handling identical.
    source = open_table(os.fspath(path), fmt="tsv", genes_as_rows=True)
    source.info = {"format": "xena"}
    return source
