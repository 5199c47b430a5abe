"""The recommender's MLflow model file ("models from code"): ``recsys package`` logs this source, and
``mlflow.pyfunc.load_model`` / ``mlflow models serve`` run it to get the model, so nothing pickled is
ever loaded. Its state (both models' weights as safetensors, the index, the tables) is the bundle
artifact that ``RecommenderModel.load_context`` reads and checks (``app.bundle.load_bundle``)."""

import mlflow

from app.serving import RecommenderModel

mlflow.models.set_model(RecommenderModel())
