"""captune: hyperparameter search for image captioning with Ray Tune, Optuna and MLflow."""
