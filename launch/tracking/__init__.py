"""MLflow: runs tracked from the training process (`sink`), the model registry and its promotion gate
(`registry`), trained models read back from checkpoints or the registry (`artifacts`), and where the
store is (`store`). MLflow itself is imported only inside these modules, when used."""
