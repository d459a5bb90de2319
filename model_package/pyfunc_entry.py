"""Models-from-code entry file of the Kronos pyfunc (`mlflow.pyfunc.log_model(python_model=...)`)."""

from mlflow.models import set_model

from model_package.pyfunc import KronosPyfuncModel

set_model(KronosPyfuncModel())
