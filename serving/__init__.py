"""The captioner as a served MLflow model (captune.serving): logged from a checkpoint, what a
request may carry, and the pyfunc wrapper the scoring server runs. Above trainables, below search."""
