"""The names the flows write into MLflow and read back: experiments, tags, metric prefixes.

    from flows.names import DATE_TAG, GATE_TAG, BY_STEP
    tracker.set_tags({DATE_TAG: "2026-01-08"})

One spelling each, because several modules meet on them: the run room (flows/runs.py) tags the
parent run, the register and gate tasks (flows/promotion.py) read those tags back and copy them onto
the model version, `csmf doctor` (flows/doctor.py) looks for the gate's verdict, the stage cache
(flows/resume.py) is found through the resumed tags. A typo in one of them would not fail, it would
silently find nothing. This module imports nothing, so the model server (flows/registry.py) and
`csmf doctor` read the names without loading Prefect.
"""

from __future__ import annotations

# ---- experiments ---------------------------------------------------------------------------------
DAILY_EXPERIMENT = "csmf"  # the daily flow's parent runs `csmf-daily-<date>`
COMPARE_EXPERIMENT = "csmf-compare"  # the comparison flow's parent runs `csmf-compare-<date>`
TUNE_EXPERIMENT = "csmf-tune"  # `csmf tune`: parent runs `csmf-tune-<date>`, a child run per trial
REPLAY_EXPERIMENT = "csmf-replay"  # `csmf replay`: one run per replay, the report and per-day figures

# ---- parent-run tags: what the run is (set when it opens, copied onto its model version) -----------
DATE_TAG = "csmf.date"  # the evaluation day D
# train.mode (flows/incremental.py): full | incremental, the registry version it continued ("none" for a
# full run) and the run date of the last full retrain in its line (the schedule of full retrains)
TRAIN_MODE_TAG = "csmf.train_mode"
PARENT_VERSION_TAG = "csmf.parent_model_version"
LAST_FULL_TAG = "csmf.last_full_date"
DATASET_TAG = "csmf.dataset"  # the dataset's name (dataset.yaml)
DATASET_DIR_TAG = "csmf.dataset_dir"
DATASET_DIGEST_TAG = "csmf.dataset_digest"  # flows.inputs.dataset_digest over the files the run reads
DATASET_DIGEST_KIND_TAG = "csmf.dataset_digest_kind"  # "content" | "stat"
CONFIG_DIGEST_TAG = "csmf.config_digest"  # every config section
TRAINING_DIGEST_TAG = "csmf.training_digest"  # the sections that shape training (flows/resume.py)
CODE_VERSION_TAG = "csmf.code_version"
WORKDIR_TAG = "csmf.workdir"  # <home>/runs/<D>/<flow-run-id>: retention never deletes the champion's
KIND_TAG = "csmf.kind"  # "compare" on the comparison's parent, "compare-run" on its children
FLOW_RUN_ID_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"

# ---- what the run did ------------------------------------------------------------------------------
STEP_TAG = "csmf.step"  # on every child run: the step it tracks; its other tags are csmf.<keyword>
# of flows.runs.child_run: kind, stage, stage_name, step_index, resumed_from (a resumed step: the
# earlier parent run it came from), method (a comparison run)
RESUMED_PREFIX = "csmf.resumed."  # parent: csmf.resumed.<step> = that earlier parent run
RESUMED_STAGES_TAG = "csmf.resumed_stages"  # parent: the resumed steps, comma-separated, or "none"
MODEL_VERSION_TAG = "csmf.model_version"
MODEL_ID_TAG = "csmf.model_id"
REGISTERED_TAG = "csmf.registered"  # "new", or "reused vN: ..." for an identical re-run
GATE_TAG = "csmf.gate"  # "promoted" | "kept", on the parent run and the model version
GATE_REASON_TAG = "csmf.gate_reason"
# on the model version: "true" when the gate's verification (exact fusion, frozen parameters, index ==
# towers) passed, whatever it decided; train.start_from=line continues only such versions
GATE_VERIFIED_TAG = "csmf.gate_verified"
TUNED_CONFIG_TAG = "csmf.tuned_config"  # parent: the tuned config applied ("<path> (sha256 ..)") or "none"
GATE_DAYS_TAG = "csmf.gate_days"  # on the gate child run: the days both models were scored on

# ---- model-version tags ----------------------------------------------------------------------------
RUN_TAG = "csmf.parent_run_id"  # the daily flow's MLflow parent run that registered the version
REUSED_BY_TAG = "csmf.reused_by"  # the latest parent run that reused the version (identical inputs)
TRAIN_DATES_TAG = "csmf.train_dates"  # "2026-01-01..2026-01-04 (4 days)"
MODEL_DIGEST_TAG = "csmf.model_digest"  # flows.registry.model_digest of the checkpoint

# ---- metric prefixes -------------------------------------------------------------------------------
# After every cascade step, each objective trained so far under its own mode, on the evaluation
# day(s): test/by_step/<objective>/recall@K (MLflow: recall_at_K), also on the parent at step = index.
BY_STEP = "test/by_step"
# The final model on the evaluation day(s): test/<objective>/<scorer>/recall@K.
TEST = "test"
# Held-out validation days (data.val_days > 0), a train step's epoch selection:
# val/<objective>/{best_epoch, start_recall@K, best_recall@K, last_recall@K}.
VAL = "val"
