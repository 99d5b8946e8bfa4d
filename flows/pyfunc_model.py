"""The file MLflow logs as the csmf pyfunc model ("models from code"; flows/registry.py logs it).

MLflow runs this file when it loads a version (`mlflow.pyfunc.load_model`, `mlflow models serve`),
with the version's code paths (`csmf_core`, `data_contracts`, `flows`) on sys.path; the serving bundle
is the model's artifact "bundle", opened by `CSMFPyfunc.load_context`. Nothing is pickled: the model
is this source, the bundle and the pinned requirements.
"""

import mlflow

from flows.registry import CSMFPyfunc

mlflow.models.set_model(CSMFPyfunc())
