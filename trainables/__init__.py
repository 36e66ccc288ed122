"""The captioners, their training and what they run on (captune.trainables)."""

# What a Ray worker of a captune job runs, preloaded by the node's fork server
# (captune.infra.forkserver) so that a trial's process starts with it imported: the commands that
# start Ray pass it to captune.infra.raycluster.init_ray. (captune.trainables.ray_train is imported
# by the trial actor itself: captune.search.trial._Entry.)
WORKER_PRELOAD = ("torch", "torchvision", "nltk", "pandas", "mlflow", "captune.trainables.loop")
