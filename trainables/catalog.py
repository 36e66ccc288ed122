"""The architectures and encoders by name. Kept free of torch so that the CLI and the config
check answer in a second: importing torch and torchvision takes ~5 s on a small machine."""

ARCHS = ("cnn-lstm", "resnet-gru")
VGG_ENCODERS = ("vgg-small", "vgg11", "vgg13", "vgg16", "vgg19")
RESNET_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Beam widths: captioning papers use 3 to 5. Wider beams favour short captions (the widest one
# found ends at once): from about 40 on the built-in dataset every caption came out empty, and
# memory grows with the width. Refused above this, before anything is decoded.
MAX_BEAM = 20
MAX_ALPHA = 2.0  # the largest length penalty exponent decoding takes (captune.trainables.decoding.length_penalty)
CAPTION_BEAM = 3  # captioning new images (`captune caption`, a served model) unless asked otherwise

# The scores of generated captions (captune.trainables.metrics), and their names in the literature.
SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l")
HEADLINE = ("bleu4", "cider", "rouge_l")  # the scores a table of runs shows, beside their objective
SCORE_LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "cider": "CIDEr-D",
                "rouge_l": "ROUGE-L"}

# The validation scores that may pick a run's best epoch and a sweep's champion
# (captune.trainables.metrics.SCORES): BLEU-4, the mission's objective, and CIDEr-D, the COCO
# leaderboard's main metric.
OBJECTIVES = ("bleu4", "cider")

# Words per generated caption that a request may ask for: captions run to 10-20 words, and a
# decoding step costs the same whether or not a caption has ended, so a bound keeps a request's
# time proportional to what captions need.
MAX_CAPTION_WORDS = 100

# A checkpoint's file in its folder (captune.trainables.checkpoint), named here, free of torch, for
# the code that moves checkpoints without loading them (captune.trainables.reporting).
CHECKPOINT_FILE = "model.pt"
# The flag a sweep trial's epoch report carries once the sweep's time budget is spent: Tune then
# stops the trial there (captune.search.budget), and its last result says why.
OUT_OF_TIME = "out_of_time"
