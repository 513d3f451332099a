"""MLflow models-from-code entry point of the served recommender (``rec_models.serving``).

``rec_pipelines.registry.ModelRegistry.log_recommender`` logs this file with the ``rec_models``
package as ``code_paths``; MLflow runs it at load time to get the model.
"""

import mlflow.models

from rec_models.serving import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
