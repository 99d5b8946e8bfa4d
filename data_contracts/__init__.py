"""Canonical dataset contract (docs/architecture.md section 1): schema, validation, quarantine, importers.

    from data_contracts import import_kuairand, validate_dataset, clean_events_lazy
    import_kuairand("../shared/data/kuairand", "data/kuairand")
    report = validate_dataset("data/kuairand").raise_if_errors()
    events = clean_events_lazy("data/kuairand", dates=["2022-05-06"])   # polars LazyFrame

Imports only polars, pyarrow and yaml (never torch, prefect or mlflow).
"""

from data_contracts.kuairand import ImportSummary, import_kuairand
from data_contracts.layout import Partition, list_partitions, partition_files, scan_partition
from data_contracts.quarantine import clean_events_lazy
from data_contracts.report import ContractError, ValidationReport, Violation
from data_contracts.rules import LABEL_NAME_PATTERNS, ROW_RULES, RULES, label_like
from data_contracts.schema import (
    DatasetSpec,
    Features,
    Objective,
    SpecError,
    TableFeatures,
    infer_features,
    inferred_feature_kind,
    load_spec,
    parse_spec,
    read_name,
    write_spec,
)
from data_contracts.validate import validate_dataset

__all__ = [
    "ContractError",
    "DatasetSpec",
    "Features",
    "ImportSummary",
    "LABEL_NAME_PATTERNS",
    "Objective",
    "Partition",
    "ROW_RULES",
    "RULES",
    "SpecError",
    "TableFeatures",
    "ValidationReport",
    "Violation",
    "clean_events_lazy",
    "import_kuairand",
    "infer_features",
    "inferred_feature_kind",
    "label_like",
    "list_partitions",
    "load_spec",
    "parse_spec",
    "partition_files",
    "scan_partition",
    "read_name",
    "validate_dataset",
    "write_spec",
]
